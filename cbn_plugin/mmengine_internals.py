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


def runner_has_loaded(runner) -> bool:
    """Whether the Runner has loaded its checkpoint already: ``Runner._has_loaded``.

    ``Runner.load_or_resume`` sets it after loading and returns at once when
    it is set (``Runner.train`` then ``Runner.test`` load once); the file
    check in ``before_run`` skips a file that will not be read again.
    """
    return bool(runner._has_loaded)


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


#: The wraps around ``Runner.save_checkpoint``, innermost first: ``'atomic'``
#: (:class:`~cbn_plugin.engine.AtomicCheckpointHook`: encloses the file write
#: alone), ``'rank_states'`` (:class:`~cbn_plugin.engine.RankStateHook`) and
#: ``'rng'`` (:class:`~cbn_plugin.engine.ResumeRNGHook`), which gather every
#: rank's state to rank 0 before the call. The order is fixed here, not by the
#: order the hooks run in, so every Runner gets the same chain.
SAVE_CHECKPOINT_WRAPS = ('atomic', 'rank_states', 'rng')


def wrap_save_checkpoint(runner, key: str, wrap, owner=None) -> bool:
    """Add ``wrap`` (``save_checkpoint -> save_checkpoint``) around the Runner's method.

    Why the method and not ``before_save_checkpoint``: ``Runner.save_checkpoint``
    is ``master_only``, so the hook stage runs on rank 0 alone, while
    ``CheckpointHook`` calls the method on every rank; what all ranks must do
    together (gather their state to rank 0) and what must enclose the file
    write (write it atomically) happens around the call.

    Each ``key`` of :data:`SAVE_CHECKPOINT_WRAPS` is wrapped once: every wrap
    chains to the one inside it, in that order whichever hook comes first, and
    a second wrap under a key already there changes nothing (a hook listed
    twice, or whose ``before_run`` runs twice). Returns whether it wrapped.
    :func:`unwrap_save_checkpoint` removes a key (``owner``'s only, when given).
    """
    if key not in SAVE_CHECKPOINT_WRAPS:
        raise ValueError(f'wrap_save_checkpoint key {key!r}: must be one of '
                         f'{SAVE_CHECKPOINT_WRAPS}')
    current = runner.__dict__.get('save_checkpoint')
    wraps = getattr(current, '_cbn_wraps', None)
    if wraps is None:
        # The class's method, or a patch someone else put on this Runner first.
        base, patched, wraps = runner.save_checkpoint, current is not None, {}
    else:
        base, patched = current._cbn_base, current._cbn_base_patched
    if key in wraps:
        return False
    _install(runner, base, patched, {**wraps, key: (wrap, owner)})
    return True


def unwrap_save_checkpoint(runner, key: str | None = None, owner=None) -> None:
    """Remove the wrap ``key`` (every wrap when ``None``; only ``owner``'s when given).

    When none is left the Runner gets back what it had before the first
    wrap (its class's method).
    """
    current = runner.__dict__.get('save_checkpoint')
    wraps = getattr(current, '_cbn_wraps', None)
    if wraps is None:
        return
    kept = {k: (w, o) for k, (w, o) in wraps.items()
            if not ((key is None or k == key) and (owner is None or o is owner))}
    if kept:
        _install(runner, current._cbn_base, current._cbn_base_patched, kept)
    elif current._cbn_base_patched:
        runner.save_checkpoint = current._cbn_base
    else:
        del runner.save_checkpoint


def _install(runner, base, patched: bool, wraps: dict) -> None:
    """Put ``base`` wrapped by ``wraps`` (in :data:`SAVE_CHECKPOINT_WRAPS` order) on the Runner."""
    chain = base
    for key in SAVE_CHECKPOINT_WRAPS:
        if key in wraps:
            chain = wraps[key][0](chain)

    @functools.wraps(base)
    def save_checkpoint(*args, **kwargs):
        return chain(*args, **kwargs)

    save_checkpoint._cbn_wraps = wraps
    save_checkpoint._cbn_base = base
    save_checkpoint._cbn_base_patched = patched
    runner.save_checkpoint = save_checkpoint


def save_checkpoint_wraps(runner) -> tuple[str, ...]:
    """The keys wrapped around this Runner's ``save_checkpoint``, innermost first."""
    wraps = getattr(runner.__dict__.get('save_checkpoint'), '_cbn_wraps', {})
    return tuple(k for k in SAVE_CHECKPOINT_WRAPS if k in wraps)
