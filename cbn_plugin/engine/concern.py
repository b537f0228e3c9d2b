"""What the checkpoint hooks share: one concern each, acting once per Runner.

Each hook of :mod:`cbn_plugin.engine` handles one concern (``concern``).
Listed twice (two entries in ``custom_hooks``, or a hook beside a
``WeightsOnlyCheckpointHook`` that has the same part on), only the first of
``runner.hooks`` acts and the others do nothing: state the first gathered or
loaded is never split between two instances, and nothing is done twice.
"""
from __future__ import annotations

import functools
import logging

from mmengine.hooks import Hook
from mmengine.logging import print_log

from ..mmengine_internals import wrap_save_checkpoint
from .rank_state import gather_to_writer


def concern_hooks(runner, concern: str) -> list:
    """The hooks of ``runner.hooks`` (and parts of bundles) that handle ``concern``, in order."""
    found = []
    for hook in getattr(runner, 'hooks', ()):
        for part in getattr(hook, 'parts', (hook, )):
            if getattr(part, 'concern', None) == concern:
                found.append(part)
    return found


class CheckpointConcernHook(Hook):
    """Base of the checkpoint hooks: ``acts(runner)`` is ``False`` for a second one."""

    concern = ''

    def acts(self, runner) -> bool:
        """Whether this hook is the first of its concern in ``runner.hooks`` (or not in it)."""
        found = concern_hooks(runner, self.concern)
        return not found or found[0] is self or self not in found

    def claim(self, runner) -> bool:
        """:meth:`acts`, warning once (in ``before_run``) when another comes first."""
        if self.acts(runner):
            return True
        first = concern_hooks(runner, self.concern)[0]
        print_log(f'{type(self).__name__}: {type(first).__name__} comes before it in the '
                  f'Runner\'s hooks and handles the same part ({self.concern!r}); this one '
                  'does nothing (list each checkpoint hook once)', logger='current',
                  level=logging.WARNING)
        return False


def gather_around_save(hook, runner, key: str, local) -> bool:
    """Wrap ``runner.save_checkpoint`` (as ``key``) to gather ``local()`` to rank 0 first.

    ``Runner.save_checkpoint`` is ``master_only``: on the other ranks it
    returns at once and ``before_save_checkpoint`` never runs there. But
    ``CheckpointHook`` (the only caller in MMEngine and MMDetection) calls it
    on every rank, so the wrapper is where all ranks meet. Rank 0's
    ``before_save_checkpoint`` finds the list by rank in ``hook._gathered``.
    """
    def wrap(save):
        @functools.wraps(save)
        def save_checkpoint(*args, **kwargs):
            hook._gathered = gather_to_writer(local())
            try:
                return save(*args, **kwargs)
            finally:
                hook._gathered = None

        return save_checkpoint

    return wrap_save_checkpoint(runner, key, wrap, owner=hook)


def checkpoint_progress(checkpoint: dict) -> tuple:
    """``(epoch, iter)`` of a checkpoint's ``meta`` (``None`` for what it lacks)."""
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    return meta.get('epoch'), meta.get('iter')


def resumed_at(runner, progress) -> bool:
    """Whether ``before_train`` is that of a run resumed from a checkpoint at ``progress``.

    ``load_from`` (fine-tuning) loads a checkpoint too, but its loop starts
    at iteration 0: its progress is not the checkpoint's.
    """
    epoch, it = progress
    return bool(it) and (runner.epoch, runner.iter) == (epoch, it)
