"""``ResumeRNGHook``: a resumed run draws the random numbers the uninterrupted run would.

The RNG states are the core's :mod:`cbn_plugin.rng`; what resumes exactly and
what does not: ``docs/checkpoints.md`` (Exact resume).
"""
from __future__ import annotations

import logging

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.logging import print_log

from ..mmengine_internals import run_after_resume_replay, runner_resumes, unwrap_save_checkpoint
from ..rng import RNG_KEY, get_rng_state, set_rng_state
from .concern import (CheckpointConcernHook, checkpoint_progress, gather_around_save,
                      resumed_at)
from .rank_state import rank_states_entry, read_rank_states


class ResumeRNGHook(CheckpointConcernHook):
    """Save every rank's RNG states in checkpoints; restore them on resume.

    ``checkpoint['rng_state']`` is rank 0's states,
    ``checkpoint['rank_states']['ranks'][r]['rng_state']`` rank r's (gathered
    to rank 0 around ``Runner.save_checkpoint``, the ``'rng'`` wrap). Each
    rank restores its own in ``before_train`` of a run resumed with the same
    world size (in an ``IterBasedTrainLoop``, after the batches it replays);
    another world size restores nothing, with a warning. Validations are
    kept out of the training stream (``before_val``/``after_val``): a best
    checkpoint saved during a validation stores the state from before it.
    ``before_train`` of a resume also warns about what the data's randomness
    cannot reproduce (another sampler seed, persistent workers).

    Priority ``'VERY_LOW'``: it restores after the other hooks' ``before_train``
    and saves before ``CheckpointCodecHook`` (``'LOWEST'``) encodes.
    """

    priority = 'VERY_LOW'
    concern = 'rng'

    def __init__(self) -> None:
        self._loaded = None  # (state, or why there is none; epoch; iter)
        self._loaded_seed = None
        self._val_rng = None
        self._gathered = None

    def _train_rng_state(self) -> dict:
        # During a validation (a best checkpoint, or save_best re-saving the newest
        # one), the training stream's state is the one from before it.
        return self._val_rng if self._val_rng is not None else get_rng_state()

    def before_run(self, runner) -> None:
        if self.claim(runner) and get_world_size() > 1:
            gather_around_save(self, runner, 'rng',
                               lambda: {'rng_state': self._train_rng_state()})

    def after_run(self, runner) -> None:
        unwrap_save_checkpoint(runner, 'rng', owner=self)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # Rank 0 only (Runner.save_checkpoint is master_only).
        if not self.acts(runner):
            return
        gathered, self._gathered = self._gathered, None
        if gathered is None:
            if get_world_size() > 1:
                print_log('ResumeRNGHook: a checkpoint saved on rank 0 alone (not through '
                          'CheckpointHook, whose call every rank makes): it holds rank 0\'s '
                          'RNG states only, and a resume from it restores none',
                          logger='current', level=logging.WARNING)
            gathered = [{'rng_state': self._train_rng_state()}]
        checkpoint.setdefault(RNG_KEY, gathered[0]['rng_state'])
        if len(gathered) > 1:
            ranks = rank_states_entry(checkpoint, len(gathered))['ranks']
            for entry, local in zip(ranks, gathered):
                entry['rng_state'] = local['rng_state']

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.acts(runner):
            return
        meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
        self._loaded_seed = meta.get('seed')
        state = checkpoint.get(RNG_KEY)
        if runner_resumes(runner):  # load_from (fine-tuning, testing) restores nothing
            saved = read_rank_states(checkpoint, get_world_size(), get_rank())
            if saved.mine is not None:
                state = saved.mine.get('rng_state')
            elif not saved.single:
                state = f'the checkpoint {saved.why}'
        self._loaded = (state, *checkpoint_progress(checkpoint))

    def before_train(self, runner) -> None:
        loaded, self._loaded = self._loaded, None
        seed, self._loaded_seed = self._loaded_seed, None
        if loaded is None or not self.acts(runner):
            return
        state, epoch, it = loaded
        if not resumed_at(runner, (epoch, it)):
            return  # load_from (fine-tuning): the checkpoint's progress is not resumed
        self._check_resumed_data_order(runner, seed)
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
            print_log(f'ResumeRNGHook: RNG states not restored: {state}; random draws after '
                      'the resume differ from an uninterrupted run', logger='current',
                      level=logging.WARNING)
            return
        if not isinstance(state, dict):
            print_log('ResumeRNGHook: the resumed checkpoint holds no RNG state (not written '
                      'with ResumeRNGHook); random draws after the resume differ from an '
                      'uninterrupted run', logger='current', level=logging.WARNING)
            return
        restored = set_rng_state(state)
        if state.get('cuda') and not torch.cuda.is_available():
            print_log('ResumeRNGHook: the checkpoint holds CUDA RNG states but CUDA is '
                      'unavailable; they are not restored', logger='current',
                      level=logging.WARNING)
        where = f' (rank {get_rank()} of {get_world_size()})' if get_world_size() > 1 else ''
        print_log(f'ResumeRNGHook: restored the RNG states ({", ".join(restored)}) saved at '
                  f'epoch {epoch}, iter {it}{where}', logger='current')

    @staticmethod
    def _check_resumed_data_order(runner, seed) -> None:
        """Warn about what a resume cannot reproduce in the training data's randomness."""
        loader = runner.train_dataloader
        sampler = getattr(getattr(loader, 'batch_sampler', None), 'sampler', None)
        if not hasattr(sampler, 'seed'):
            sampler = getattr(loader, 'sampler', None)
        sampler_seed = getattr(sampler, 'seed', None)
        if seed is not None and sampler_seed is not None and int(sampler_seed) != int(seed):
            print_log(f'ResumeRNGHook: the train sampler shuffles with seed {sampler_seed}, '
                      f'but the checkpoint was written by a run seeded with {seed}: the data '
                      'order after the resume differs from an uninterrupted run. Set '
                      f'randomness.seed={seed} in the config (tools/train.py does this itself '
                      'when the config sets no seed: cbn_plugin.engine.adopt_checkpoint_seed)',
                      logger='current', level=logging.WARNING)
        workers = getattr(loader, 'num_workers', 0)
        if workers > 0 and getattr(loader, 'persistent_workers', False):
            print_log(f'ResumeRNGHook: train_dataloader.persistent_workers=True with '
                      f'num_workers={workers}: the uninterrupted run\'s worker processes '
                      'carry their random generators (data augmentation such as RandomFlip) '
                      'from one epoch into the next, while the resumed run\'s workers start '
                      'from the seed again, so the augmentation drawn after the resume '
                      'differs. For an exact resume set persistent_workers=False (MMEngine '
                      'then re-seeds the workers identically every epoch) or num_workers=0',
                      logger='current', level=logging.WARNING)

    def before_val(self, runner) -> None:
        if self.acts(runner):
            self._val_rng = get_rng_state()

    def after_val(self, runner) -> None:
        state, self._val_rng = self._val_rng, None
        if state is not None:
            set_rng_state(state)
