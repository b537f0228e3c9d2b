"""``WeightsOnlyCheckpointHook``: the checkpoint kit in a Runner.

Encodes checkpoints for ``torch.load``'s ``weights_only=True`` (:mod:`.codec`),
saves and restores every rank's RNG states (:mod:`.rng`) and own norm buffers
(:mod:`.rank_state`), writes files atomically and checks them before loading
(:mod:`.files`). Registered in MMEngine's root ``HOOKS`` by
``import cbn_plugin.engine``. The design, and what resumes exactly and what
does not: ``docs/checkpoints.md``.
"""
from __future__ import annotations

import functools
import logging

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log

from ..mmengine_internals import (run_after_resume_replay, runner_resumes,
                                  unwrap_save_checkpoint, wrap_save_checkpoint)
from ..rng import RNG_KEY, get_rng_state, set_rng_state
from .codec import decode_checkpoint, encode_checkpoint
from .files import (atomic_save_checkpoint, check_checkpoint_file, checkpoint_to_load,
                    is_local_path)
from .rank_state import (RANK_STATES_FORMAT, RANK_STATES_KEY, empty_cbn_windows,
                         gather_to_writer, rank_local_buffers, rank_local_norms, sync_shifts,
                         unwrap_model)


class WeightsOnlyCheckpointHook(Hook):
    """Weights_only-loadable, atomically written checkpoints that resume exactly.

    Each part has its own switch (constructor argument, and the top-level
    config key :func:`.switches.add_weights_only_hook` maps onto it):

    - ``encode`` (``weights_only_checkpoints``): ``before_save_checkpoint``
      encodes the checkpoint so plain ``torch.load`` (``weights_only=True``)
      reads it, and ``after_load_checkpoint`` decodes it (:mod:`.codec`).
      Decoding is always on: it only changes what was encoded.
    - ``restore_rng`` (``resume_rng_state``): every rank's RNG states are
      saved (``checkpoint['rng_state']`` is rank 0's,
      ``checkpoint['rank_states']['ranks'][r]['rng_state']`` rank r's) and
      restored by each rank in ``before_train`` of a resumed run of the same
      world size; validations are kept out of the training stream
      (``before_val``/``after_val``). A best checkpoint saved during a
      validation stores the training state from before it.
    - ``rank_states`` (``resume_rank_states``): the buffers each rank keeps
      for itself (:func:`rank_local_norms`: BN running statistics and CBN
      windows under ``broadcast_buffers=False``) are gathered from every rank
      to the writer and stored by rank; on resume each rank loads its own
      into the model. SyncCBN/SyncBN state is identical on every rank and is
      stored once (the model's ``state_dict``), plus SyncCBN's shift.
      Resuming with another world size, or from a multi-process checkpoint
      without per-rank state, loads rank 0's model and *empties* the CBN
      windows with a warning (statistics of another device's batches cannot
      stand in for this device's).
    - ``check_files`` (``check_checkpoint_files``): ``before_run`` checks the
      file the Runner is about to load or resume (``load_from``,
      ``--resume PATH``, or the one ``last_checkpoint`` names) and raises
      :class:`CheckpointFileError` / ``FileNotFoundError`` naming it when it
      is missing, truncated or corrupt (:func:`check_checkpoint_file`).
    - ``atomic_save`` (``atomic_checkpoints``): local checkpoints are written
      atomically (:func:`.files.atomic_save_checkpoint`).

    Priority ``'LOWEST'``: it encodes after every other hook has added its
    part, and restores after every other hook's ``before_train``. (The only
    other MMEngine/MMDetection hook that touches checkpoints, ``EMAHook``,
    reads and writes tensors only, which are never encoded.)
    """

    priority = 'LOWEST'

    def __init__(self, restore_rng: bool = True, check_files: bool = True,
                 atomic_save: bool = True, encode: bool = True,
                 rank_states: bool = True) -> None:
        for name, value in dict(restore_rng=restore_rng, check_files=check_files,
                                atomic_save=atomic_save, encode=encode,
                                rank_states=rank_states).items():
            if not isinstance(value, bool):
                raise ValueError(f'WeightsOnlyCheckpointHook {name} must be True or False, '
                                 f'got {value!r}')
        self.restore_rng, self.check_files, self.atomic_save = restore_rng, check_files, atomic_save
        self.encode, self.rank_states = encode, rank_states
        self._loaded_rng = None
        self._loaded_seed = None
        self._loaded_shifts = None
        self._val_rng = None
        self._gathered = None

    # -- files
    def before_run(self, runner) -> None:
        if self.check_files:
            path, source = checkpoint_to_load(runner)
            if path is not None and is_local_path(path):
                check_checkpoint_file(path, note=source)
        gather = (self.restore_rng or self.rank_states) and get_world_size() > 1

        def wrap(save):
            if self.atomic_save:
                save = atomic_save_checkpoint(save)
            if gather:
                save = self._gathering_save_checkpoint(save, runner)
            return save

        wrap_save_checkpoint(runner, wrap)

    def after_run(self, runner) -> None:
        unwrap_save_checkpoint(runner)  # back to the class's method

    # -- save / load
    def _local_state(self, runner) -> dict:
        """What this rank adds to a checkpoint: its RNG states and own norm buffers."""
        local = {}
        if self.restore_rng:
            # During a validation (a best checkpoint, or save_best re-saving the
            # newest one), the training stream's state is the one from before it.
            local['rng_state'] = self._val_rng if self._val_rng is not None else \
                get_rng_state()
        if self.rank_states and get_world_size() > 1:
            local['buffers'] = rank_local_buffers(runner.model)
            local['sync_shifts'] = sync_shifts(runner.model)
        return local

    def _gathering_save_checkpoint(self, original, runner):
        """Wrap ``Runner.save_checkpoint`` to gather every rank's state to rank 0 first.

        ``Runner.save_checkpoint`` is ``master_only``: on the other ranks it
        returns at once and ``before_save_checkpoint`` never runs there. But
        ``CheckpointHook`` (the only caller in MMEngine and MMDetection) calls
        it on every rank, so the wrapper is where all ranks meet.
        """
        @functools.wraps(original)
        def save_checkpoint(*args, **kwargs):
            self._gathered = gather_to_writer(self._local_state(runner))
            try:
                return original(*args, **kwargs)
            finally:
                self._gathered = None

        return save_checkpoint

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # Rank 0 only (Runner.save_checkpoint is master_only).
        gathered, self._gathered = self._gathered, None
        if gathered is None and (self.restore_rng or self.rank_states):
            if get_world_size() > 1:
                print_log('WeightsOnlyCheckpointHook: a checkpoint saved on rank 0 alone (not '
                          'through CheckpointHook, whose call every rank makes): it holds rank '
                          "0's state only, and a resume from it restarts the CBN windows empty",
                          logger='current', level=logging.WARNING)
            local = self._local_state(runner)
            local.pop('buffers', None)
            local.pop('sync_shifts', None)
            gathered = [local]
        if gathered is not None:
            if self.restore_rng and RNG_KEY not in checkpoint:
                checkpoint[RNG_KEY] = gathered[0]['rng_state']
            if len(gathered) > 1:
                gathered[0].pop('buffers', None)  # rank 0's are the state_dict's
                checkpoint[RANK_STATES_KEY] = {
                    'format': RANK_STATES_FORMAT, 'world_size': len(gathered),
                    'buffers': self.rank_states, 'ranks': gathered}
        if self.encode:
            encode_checkpoint(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        decode_checkpoint(checkpoint)
        meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
        self._loaded_seed = meta.get('seed')
        progress = (meta.get('epoch'), meta.get('iter'))
        rng_state = checkpoint.get(RNG_KEY)
        if not runner_resumes(runner):
            # load_from (fine-tuning, testing): rank 0's model, nothing else.
            self._loaded_rng = (rng_state, *progress)
            return
        world, rank = get_world_size(), get_rank()
        saved = checkpoint.get(RANK_STATES_KEY)
        if saved is not None:
            if not isinstance(saved, dict) or saved.get('format') != RANK_STATES_FORMAT:
                found = saved.get('format') if isinstance(saved, dict) else type(saved).__name__
                raise ValueError(f'checkpoint[{RANK_STATES_KEY!r}] has format {found!r}; this '
                                 'version of cbn_plugin.engine reads format '
                                 f'{RANK_STATES_FORMAT}')
            saved_world = saved['world_size']
        elif isinstance(rng_state, dict):
            saved_world = rng_state.get('world_size', 1)
        else:
            saved_world = None  # not written by this hook
        mine = saved['ranks'][rank] if saved is not None and saved_world == world else None
        if saved is not None:
            self._loaded_shifts = saved['ranks'][0].get('sync_shifts')

        single = world == 1 and saved_world in (None, 1)
        if single:
            why = None
        elif saved_world is None:
            why = 'holds no record of the world size it was written with'
        elif saved_world != world:
            why = f'was written by {saved_world} processes and this run has {world}'
        else:
            why = None if mine is not None else (
                f"holds only rank 0's state of a {saved_world}-process run")

        state_dict = checkpoint.get('state_dict')
        if not isinstance(state_dict, dict):
            state_dict = {}
        if mine is not None and saved.get('buffers'):
            if rank != 0:
                self._use_rank_buffers(runner.model, state_dict, mine['buffers'])
        elif not single:
            # Rank 0's windows are all the checkpoint has for this run: every rank
            # would pool another device's (or another layout's) batches.
            emptied = empty_cbn_windows(state_dict, runner.model)
            if emptied:
                what = why or (f'of a {saved_world}-process run was written without each '
                               "rank's norm buffers (resume_rank_states=False)")
                print_log(f'WeightsOnlyCheckpointHook: the checkpoint {what}: the model '
                          "(parameters, rank 0's running statistics) is restored, but the "
                          f'windows of {len(emptied)} CBN layers restart empty (statistics of '
                          "other devices' batches cannot be compensated to this device's; "
                          'step counters and burn-in go on). Training continues, but not as '
                          'it would have without the interruption', logger='current',
                          level=logging.WARNING)
        if mine is not None:
            rng_state = mine.get('rng_state')
        elif not single:
            rng_state = f'the checkpoint {why}'
        self._loaded_rng = (rng_state, *progress)

    @staticmethod
    def _use_rank_buffers(model, state_dict: dict, buffers: dict) -> None:
        """Put this rank's own norm buffers into the ``state_dict`` the model loads."""
        for name, module in rank_local_norms(model).items():
            prefix = f'{name}.' if name else ''
            for key in module._buffers:
                if prefix + key not in buffers:
                    state_dict.pop(prefix + key, None)  # None on this rank (no step yet)
        state_dict.update(buffers)

    # -- RNG
    def before_train(self, runner) -> None:
        self._check_kept_checkpoints(runner)
        loaded, self._loaded_rng = self._loaded_rng, None
        shifts, self._loaded_shifts = self._loaded_shifts, None
        seed, self._loaded_seed = self._loaded_seed, None
        if loaded is None:
            return
        state, epoch, it = loaded
        if not it or (runner.epoch, runner.iter) != (epoch, it):
            return  # load_from (fine-tuning): the checkpoint's progress is not resumed
        self._check_resumed_data_order(runner, seed)
        if shifts:
            from ..layer import SyncCrossIterationBatchNorm2d
            model = unwrap_model(runner.model)
            for name, module in model.named_modules():
                if isinstance(module, SyncCrossIterationBatchNorm2d) and name in shifts:
                    module.stats_shift = shifts[name].to(_device_of(module))
        if not self.restore_rng:
            return
        # IterBasedTrainLoop pushes the batches it skips on resume through the
        # pipeline after this hook, drawing random augmentation (RandomFlip) as it
        # goes; the uninterrupted run's state was saved after those batches. So
        # restore once the replay is done, before the first new batch.
        if not run_after_resume_replay(runner.train_loop,
                                       lambda: self._restore_rng_state(state, epoch, it)):
            self._restore_rng_state(state, epoch, it)

    @staticmethod
    def _restore_rng_state(state, epoch: int, it: int) -> None:
        if isinstance(state, str):
            print_log(f'WeightsOnlyCheckpointHook: RNG states not restored: {state}; random '
                      'draws after the resume differ from an uninterrupted run',
                      logger='current', level=logging.WARNING)
            return
        if not isinstance(state, dict):
            print_log('WeightsOnlyCheckpointHook: the resumed checkpoint holds no RNG state '
                      '(not written by this hook); random draws after the resume differ '
                      'from an uninterrupted run', logger='current', level=logging.WARNING)
            return
        restored = set_rng_state(state)
        if state.get('cuda') and not torch.cuda.is_available():
            print_log('WeightsOnlyCheckpointHook: the checkpoint holds CUDA RNG states but '
                      'CUDA is unavailable; they are not restored', logger='current',
                      level=logging.WARNING)
        where = f' (rank {get_rank()} of {get_world_size()})' if get_world_size() > 1 else ''
        print_log(f'WeightsOnlyCheckpointHook: restored the RNG states ({", ".join(restored)}) '
                  f'saved at epoch {epoch}, iter {it}{where}', logger='current')

    @staticmethod
    def _check_kept_checkpoints(runner) -> None:
        from mmengine.hooks import CheckpointHook
        for hook in runner.hooks:
            if isinstance(hook, CheckpointHook) and getattr(hook, 'max_keep_ckpts', -1) == 1:
                print_log('WeightsOnlyCheckpointHook: CheckpointHook max_keep_ckpts=1: MMEngine '
                          'deletes the only kept checkpoint before it writes the next one, so '
                          'a crash during that write leaves no checkpoint to resume from. Use '
                          'max_keep_ckpts >= 2 (or -1, keep all)', logger='current',
                          level=logging.WARNING)

    @staticmethod
    def _check_resumed_data_order(runner, seed) -> None:
        """Warn about what a resume cannot reproduce in the training data's randomness."""
        loader = runner.train_dataloader
        sampler = getattr(getattr(loader, 'batch_sampler', None), 'sampler', None)
        if not hasattr(sampler, 'seed'):
            sampler = getattr(loader, 'sampler', None)
        sampler_seed = getattr(sampler, 'seed', None)
        if seed is not None and sampler_seed is not None and int(sampler_seed) != int(seed):
            print_log(f'WeightsOnlyCheckpointHook: the train sampler shuffles with seed '
                      f'{sampler_seed}, but the checkpoint was written by a run seeded with '
                      f'{seed}: the data order after the resume differs from an uninterrupted '
                      f'run. Set randomness.seed={seed} in the config (tools/train.py does '
                      'this itself when the config sets no seed: '
                      'cbn_plugin.engine.adopt_checkpoint_seed)', logger='current',
                      level=logging.WARNING)
        workers = getattr(loader, 'num_workers', 0)
        if workers > 0 and getattr(loader, 'persistent_workers', False):
            print_log(f'WeightsOnlyCheckpointHook: train_dataloader.persistent_workers=True '
                      f'with num_workers={workers}: the uninterrupted run\'s worker processes '
                      'carry their random generators (data augmentation such as RandomFlip) '
                      'from one epoch into the next, while the resumed run\'s workers start '
                      'from the seed again, so the augmentation drawn after the resume '
                      'differs. For an exact resume set persistent_workers=False (MMEngine '
                      'then re-seeds the workers identically every epoch) or num_workers=0',
                      logger='current', level=logging.WARNING)

    def before_val(self, runner) -> None:
        if self.restore_rng:
            self._val_rng = get_rng_state()

    def after_val(self, runner) -> None:
        state, self._val_rng = self._val_rng, None
        if state is not None:
            set_rng_state(state)


def _device_of(module) -> torch.device:
    """Where a norm layer keeps its state: its first parameter's or buffer's device."""
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return tensor.device
    return torch.device('cpu')
