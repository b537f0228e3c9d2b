"""The checkpoint and launcher kit for MMEngine Runners, apart from the layer.

``import cbn_plugin.engine`` registers the checkpoint hooks in MMEngine's root
``HOOKS`` (a plain ``import cbn_plugin`` does not), one concern each:

- ``CheckpointFileCheckHook``: a damaged checkpoint file is refused by name;
- ``AtomicCheckpointHook``: checkpoint files are written atomically;
- ``RankStateHook``: every rank's own norm buffers (CBN windows) are saved
  and restored by rank;
- ``ResumeRNGHook``: every rank's RNG states are saved and restored;
- ``CheckpointCodecHook``: checkpoints load with ``torch.load(weights_only=True)``;

and ``WeightsOnlyCheckpointHook``, all five in one entry. The tools
(``tools/train.py``, ``test.py``, ``precise_cbn.py``) import it and add the
five to every config (:func:`add_checkpoint_hooks`); a config run by other
means lists them::

    custom_imports = dict(imports=['cbn_plugin', 'cbn_plugin.engine'])
    custom_hooks = [..., dict(type='CheckpointFileCheckHook'),
                    dict(type='AtomicCheckpointHook'), dict(type='RankStateHook'),
                    dict(type='ResumeRNGHook'), dict(type='CheckpointCodecHook')]

One concept per module: :mod:`.codec` (weights_only encoding), :mod:`.files`
(file checks, atomic writes), :mod:`.seed` (the resumed run's seed),
:mod:`.rank_state` (per-rank buffers), a module per hook (``*_hook.py``),
:mod:`.concern` (what the hooks share), :mod:`.hook` (the bundle),
:mod:`.switches` (config switches); the RNG states are the core's
:mod:`cbn_plugin.rng`, and what the hooks read of MMEngine's internals is
:mod:`cbn_plugin.mmengine_internals`. The engine imports the core, never the
other way. What the tools share (command line, config loading, launchers) is
``tools/launch_support.py``. Design notes: ``docs/checkpoints.md``.
"""
from mmengine.registry import HOOKS

from .atomic_hook import AtomicCheckpointHook
from .codec import (FORMAT, FORMAT_KEY, TAG, decode, decode_checkpoint, encode,
                    encode_checkpoint, load_checkpoint)
from .codec_hook import CheckpointCodecHook
from .file_check_hook import CheckpointFileCheckHook
from .files import (PARTIAL_SUFFIX, CheckpointFileError, atomic_save_checkpoint,
                    check_checkpoint_file, checkpoint_to_resume, save_checkpoint_file)
from .hook import WeightsOnlyCheckpointHook
from .rank_state import (RANK_STATES_FORMAT, RANK_STATES_KEY, empty_cbn_windows,
                         rank_local_buffers, rank_local_norms)
from .rank_state_hook import RankStateHook
from ..rng import RNG_FORMAT, RNG_KEY, get_rng_state, set_rng_state
from .rng_hook import ResumeRNGHook
from .seed import adopt_checkpoint_seed, read_checkpoint_meta
from .switches import CONCERN_HOOKS, CONFIG_SWITCHES, add_checkpoint_hooks, add_weights_only_hook

# Registered by name in MMEngine's root HOOKS (every OpenMMLab scope searches it).
CHECKPOINT_HOOKS = (CheckpointFileCheckHook, AtomicCheckpointHook, RankStateHook,
                    ResumeRNGHook, CheckpointCodecHook, WeightsOnlyCheckpointHook)


def register() -> None:
    """Register the checkpoint hooks in MMEngine's root ``HOOKS`` (idempotent).

    Every OpenMMLab scope (mmdet, mmseg) searches this root registry too.
    """
    for hook in CHECKPOINT_HOOKS:
        if HOOKS.module_dict.get(hook.__name__) is not hook:
            HOOKS.register_module(hook.__name__, module=hook, force=True)


register()

__all__ = ['CHECKPOINT_HOOKS', 'CONCERN_HOOKS', 'CONFIG_SWITCHES', 'FORMAT', 'FORMAT_KEY',
           'PARTIAL_SUFFIX', 'RANK_STATES_FORMAT', 'RANK_STATES_KEY', 'RNG_FORMAT', 'RNG_KEY',
           'TAG', 'AtomicCheckpointHook', 'CheckpointCodecHook', 'CheckpointFileCheckHook',
           'CheckpointFileError', 'RankStateHook', 'ResumeRNGHook',
           'WeightsOnlyCheckpointHook', 'add_checkpoint_hooks', 'add_weights_only_hook',
           'adopt_checkpoint_seed', 'atomic_save_checkpoint', 'check_checkpoint_file',
           'checkpoint_to_resume', 'decode', 'decode_checkpoint', 'empty_cbn_windows',
           'encode', 'encode_checkpoint', 'get_rng_state', 'load_checkpoint',
           'rank_local_buffers', 'rank_local_norms', 'read_checkpoint_meta', 'register',
           'save_checkpoint_file', 'set_rng_state']
