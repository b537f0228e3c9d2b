"""``AtomicCheckpointHook``: a checkpoint file is complete or absent, never half written.

The write itself is :func:`.files.atomic_save_checkpoint`; see ``docs/checkpoints.md``.
"""
from __future__ import annotations

import logging

from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from ..mmengine_internals import unwrap_save_checkpoint, wrap_save_checkpoint
from .concern import CheckpointConcernHook
from .files import atomic_save_checkpoint


class AtomicCheckpointHook(CheckpointConcernHook):
    """Write local checkpoint files atomically.

    From ``before_run`` to ``after_run`` the Runner's ``save_checkpoint`` is
    wrapped (innermost of the wraps,
    :data:`cbn_plugin.mmengine_internals.SAVE_CHECKPOINT_WRAPS`): MMEngine
    writes ``<name>.partial-<pid>`` beside the target, which is fsynced,
    checked and ``os.replace``-d onto ``<name>``. ``before_train`` warns
    about ``CheckpointHook(max_keep_ckpts=1)``, which deletes the only kept
    checkpoint before writing the next one.
    """

    concern = 'atomic'

    def before_run(self, runner) -> None:
        if self.claim(runner):
            wrap_save_checkpoint(runner, 'atomic', atomic_save_checkpoint, owner=self)

    def after_run(self, runner) -> None:
        unwrap_save_checkpoint(runner, 'atomic', owner=self)

    def before_train(self, runner) -> None:
        if not self.acts(runner):
            return
        for hook in runner.hooks:
            if isinstance(hook, CheckpointHook) and getattr(hook, 'max_keep_ckpts', -1) == 1:
                print_log('AtomicCheckpointHook: CheckpointHook max_keep_ckpts=1: MMEngine '
                          'deletes the only kept checkpoint before it writes the next one, so '
                          'a crash during that write leaves no checkpoint to resume from. Use '
                          'max_keep_ckpts >= 2 (or -1, keep all)', logger='current',
                          level=logging.WARNING)
