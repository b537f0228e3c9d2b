"""``RankStateHook``: every rank of a distributed run gets its own CBN windows back.

The per-rank buffers are :mod:`.rank_state`'s; see ``docs/checkpoints.md``
(Exact resume).
"""
from __future__ import annotations

import logging

from mmengine.dist import get_rank, get_world_size
from mmengine.logging import print_log

from ..mmengine_internals import runner_resumes, unwrap_save_checkpoint
from .concern import (CheckpointConcernHook, checkpoint_progress, gather_around_save,
                      resumed_at)
from .rank_state import (empty_cbn_windows, rank_local_buffers, rank_states_entry,
                         read_rank_states, restore_sync_shifts, sync_shifts, use_rank_buffers)


class RankStateHook(CheckpointConcernHook):
    """Save the norm buffers each rank keeps for itself; each rank restores its own.

    Under DDP with ``broadcast_buffers=False`` every rank has its own BN
    running statistics and CBN windows (:func:`.rank_local_norms`). Around
    ``Runner.save_checkpoint`` (the ``'rank_states'`` wrap) they are gathered
    to rank 0 and stored by rank in ``checkpoint['rank_states']`` (rank 0's
    are the ``state_dict``'s); SyncCBN/SyncBN state is the same on every rank
    and stored once, plus SyncCBN's shift. On resume with the same world size
    each rank puts its own buffers into the ``state_dict`` before the model
    loads it. Resuming with another world size, or from a multi-process
    checkpoint without per-rank buffers, loads rank 0's model and *empties*
    the CBN windows with a warning (statistics of another device's batches
    cannot stand in for this device's). One process: nothing to do.

    Args:
        save_buffers (bool): Store every rank's buffers (config switch
            ``resume_rank_states``; about 69 MB per rank for an R50 CBN
            detector). With False a multi-process resume empties the
            windows. Defaults to True.

    Priority ``'VERY_LOW'``: it saves before ``CheckpointCodecHook``
    (``'LOWEST'``) encodes.
    """

    priority = 'VERY_LOW'
    concern = 'rank_states'

    def __init__(self, save_buffers: bool = True) -> None:
        if not isinstance(save_buffers, bool):
            raise ValueError('RankStateHook save_buffers must be True or False, got '
                             f'{save_buffers!r}')
        self.save_buffers = save_buffers
        self._gathered = None
        self._loaded_shifts = None
        self._progress = None

    def before_run(self, runner) -> None:
        if self.claim(runner) and self.save_buffers and get_world_size() > 1:
            gather_around_save(self, runner, 'rank_states', lambda: {
                'buffers': rank_local_buffers(runner.model),
                'sync_shifts': sync_shifts(runner.model)})

    def after_run(self, runner) -> None:
        unwrap_save_checkpoint(runner, 'rank_states', owner=self)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # Rank 0 only (Runner.save_checkpoint is master_only).
        gathered, self._gathered = self._gathered, None
        if not (self.save_buffers and self.acts(runner)):
            return
        if gathered is None:
            if get_world_size() > 1:
                print_log('RankStateHook: a checkpoint saved on rank 0 alone (not through '
                          'CheckpointHook, whose call every rank makes): it holds rank 0\'s '
                          'norm buffers only, and a resume from it restarts the CBN windows '
                          'empty', logger='current', level=logging.WARNING)
            return
        if len(gathered) > 1:
            entry = rank_states_entry(checkpoint, len(gathered))
            entry['buffers'] = True
            for rank, (mine, local) in enumerate(zip(entry['ranks'], gathered)):
                if rank == 0:
                    local = dict(local)
                    local.pop('buffers')  # rank 0's are the state_dict's
                mine.update(local)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.acts(runner):
            return
        self._progress = checkpoint_progress(checkpoint)
        if not runner_resumes(runner):
            return  # load_from (fine-tuning, testing): rank 0's model, nothing else
        rank = get_rank()
        saved = read_rank_states(checkpoint, get_world_size(), rank)
        if saved.saved is not None:
            self._loaded_shifts = saved.saved['ranks'][0].get('sync_shifts')
        state_dict = checkpoint.get('state_dict')
        if not isinstance(state_dict, dict):
            state_dict = {}
        if saved.mine is not None and saved.saved.get('buffers'):
            if rank != 0:
                use_rank_buffers(runner.model, state_dict, saved.mine['buffers'])
        elif not saved.single:
            # Rank 0's windows are all the checkpoint has for this run: every rank
            # would pool another device's (or another layout's) batches.
            emptied = empty_cbn_windows(state_dict, runner.model)
            if emptied:
                what = saved.why or (f'of a {saved.world}-process run was written without '
                                     "each rank's norm buffers (RankStateHook "
                                     'save_buffers=False, config resume_rank_states=False)')
                print_log(f'RankStateHook: the checkpoint {what}: the model (parameters, '
                          "rank 0's running statistics) is restored, but the windows of "
                          f'{len(emptied)} CBN layers restart empty (statistics of other '
                          "devices' batches cannot be compensated to this device's; step "
                          'counters and burn-in go on). Training continues, but not as it '
                          'would have without the interruption', logger='current',
                          level=logging.WARNING)

    def before_train(self, runner) -> None:
        shifts, self._loaded_shifts = self._loaded_shifts, None
        progress, self._progress = self._progress, None
        if shifts and progress is not None and self.acts(runner) and resumed_at(runner,
                                                                              progress):
            restore_sync_shifts(runner.model, shifts)
