"""``WeightsOnlyCheckpointHook``: the five checkpoint hooks as one entry of ``custom_hooks``.

Each concern is its own hook (``docs/checkpoints.md``):
:class:`.CheckpointFileCheckHook`, :class:`.AtomicCheckpointHook`,
:class:`.RankStateHook`, :class:`.ResumeRNGHook`, :class:`.CheckpointCodecHook`.
This hook runs the ones its switches leave on, in that order, and behaves as
they do listed one by one; the tools list them one by one.
"""
from __future__ import annotations

from mmengine.hooks import Hook

from .atomic_hook import AtomicCheckpointHook
from .codec_hook import CheckpointCodecHook
from .file_check_hook import CheckpointFileCheckHook
from .rank_state_hook import RankStateHook
from .rng_hook import ResumeRNGHook


def _forward(stage: str):
    def call_parts(self, runner, *args, **kwargs) -> None:
        for part in self.parts:
            getattr(part, stage)(runner, *args, **kwargs)

    call_parts.__name__ = call_parts.__qualname__ = stage
    call_parts.__doc__ = f'``{stage}`` of every part, in order.'
    return call_parts


class WeightsOnlyCheckpointHook(Hook):
    """The checkpoint kit in one hook: the five checkpoint hooks, each behind a switch.

    Args (each a switch, True by default; the top-level config key
    :func:`.switches.add_weights_only_hook` maps onto it in brackets):

    - ``check_files`` (``check_checkpoint_files``): :class:`.CheckpointFileCheckHook`;
    - ``atomic_save`` (``atomic_checkpoints``): :class:`.AtomicCheckpointHook`;
    - ``rank_states`` (``resume_rank_states``): :class:`.RankStateHook`
      (``save_buffers=rank_states``: off, a multi-process resume still
      empties the windows it cannot restore);
    - ``restore_rng`` (``resume_rng_state``): :class:`.ResumeRNGHook`;
    - ``encode`` (``weights_only_checkpoints``): :class:`.CheckpointCodecHook`
      (``encode=encode``; decoding is always on).

    ``parts`` are those hooks, in that order; every stage calls them in it.
    Priority ``'LOWEST'``: the parts' ``before_save_checkpoint`` run after
    every other hook's, the codec's last. A part whose concern another hook
    in the Runner handles first does nothing (:mod:`.concern`).
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
        self._files = CheckpointFileCheckHook()
        self._atomic = AtomicCheckpointHook()
        self._ranks = RankStateHook(save_buffers=rank_states)
        self._rng = ResumeRNGHook()
        self._codec = CheckpointCodecHook(encode=encode)

    @property
    def parts(self) -> tuple:
        """The hooks this one runs, as its switches are now."""
        # The switches are plain attributes (set before the run to change a part).
        self._ranks.save_buffers, self._codec.encode = self.rank_states, self.encode
        return tuple(part for part, on in (
            (self._files, self.check_files), (self._atomic, self.atomic_save),
            (self._ranks, True), (self._rng, self.restore_rng), (self._codec, True)) if on)

    before_run = _forward('before_run')
    after_run = _forward('after_run')
    before_train = _forward('before_train')
    before_val = _forward('before_val')
    after_val = _forward('after_val')
    before_save_checkpoint = _forward('before_save_checkpoint')
    after_load_checkpoint = _forward('after_load_checkpoint')
