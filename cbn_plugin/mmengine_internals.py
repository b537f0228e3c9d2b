"""The MMEngine internals the plugin reads, in one place (written against MMEngine 0.10.7).

Each function says which attribute or behaviour it relies on and why no
public API gives it. ``tests/test_mmengine_internals.py`` checks every one of
them against the installed MMEngine, so a release that moves one fails there,
by name, instead of somewhere in a resumed run. ``CBNHook`` uses
:func:`accumulative_counts`; the checkpoint kit (:mod:`cbn_plugin.engine`)
the others.
"""
from __future__ import annotations

import functools


def accumulative_counts(optim_wrapper) -> int:
    """Iterations per optimizer step (gradient accumulation): ``OptimWrapper._accumulative_counts``.

    The count the config gives as ``optim_wrapper.accumulative_counts``;
    MMEngine keeps it private and offers no getter. 1 for a wrapper without it
    (``OptimWrapperDict``, which does not accumulate).
    """
    return int(getattr(optim_wrapper, '_accumulative_counts', 1))


def runner_resumes(runner) -> bool:
    """Whether the Runner resumes (``resume=True``): ``Runner._resume``.

    ``after_load_checkpoint`` is called by ``Runner.resume`` and
    ``Runner.load_checkpoint`` alike, before the loop's progress is set, and
    nothing public says which of the two is running.
    """
    return bool(runner._resume)


def runner_load_from(runner):
    """The checkpoint the Runner will load or resume from: ``Runner._load_from``.

    Read in ``before_run``, to check the file before MMEngine loads it; the
    Runner's constructor argument ``load_from`` is kept only there.
    """
    return runner._load_from


def run_after_resume_replay(loop, callback) -> bool:
    """Call ``callback`` once ``IterBasedTrainLoop`` has replayed the batches of a resume.

    Resumed at iteration ``i`` (``loop.iter``), ``IterBasedTrainLoop.run``
    first pulls ``i`` batches from ``loop.dataloader_iterator`` and drops
    them (so the data order goes on where it stopped), after every
    ``before_train`` hook has run. Those batches go through the data
    pipeline, drawing random augmentation, so a random state restored in
    ``before_train`` must be restored again after them: ``callback`` runs
    right after the ``i``-th batch. Returns ``False`` (and calls nothing)
    when there is nothing to replay (an epoch-based loop, or iteration 0).
    """
    replayed = loop.iter if hasattr(loop, 'dataloader_iterator') else 0
    if replayed <= 0:
        return False
    loop.dataloader_iterator = _CallAfter(loop.dataloader_iterator, replayed, callback)
    return True


class _CallAfter:
    """An iterator that calls ``callback`` once, after its first ``count`` items."""

    def __init__(self, iterator, count: int, callback) -> None:
        self._iterator, self._left, self._callback = iterator, count, callback

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._iterator)
        if self._left > 0:
            self._left -= 1
            if self._left == 0:
                self._callback()
        return item


def wrap_save_checkpoint(runner, wrap) -> bool:
    """Replace this Runner's ``save_checkpoint`` by ``wrap(save_checkpoint)``, once.

    Why the method and not ``before_save_checkpoint``: ``Runner.save_checkpoint``
    is ``master_only``, so the hook stage runs on rank 0 alone, while
    ``CheckpointHook`` calls the method on every rank; what all ranks must do
    together (gather their state to rank 0) and what must enclose the file
    write (write it atomically) happens around the call. Returns whether it
    wrapped (``False`` when ``wrap`` returned the method unchanged, or this
    Runner's method was already wrapped); :func:`unwrap_save_checkpoint`
    undoes it.
    """
    if getattr(runner.__dict__.get('save_checkpoint'), '_cbn_wrapped', False):
        return False
    original = runner.save_checkpoint
    wrapped = wrap(original)
    if wrapped is original:
        return False

    @functools.wraps(original)
    def save_checkpoint(*args, **kwargs):
        return wrapped(*args, **kwargs)

    save_checkpoint._cbn_wrapped = True
    runner.save_checkpoint = save_checkpoint
    return True


def unwrap_save_checkpoint(runner) -> None:
    """Give the Runner back its class's ``save_checkpoint``."""
    if getattr(runner.__dict__.get('save_checkpoint'), '_cbn_wrapped', False):
        del runner.save_checkpoint
