"""The checkpoint and launcher kit for MMEngine Runners, apart from the layer.

``import cbn_plugin.engine`` registers ``'WeightsOnlyCheckpointHook'`` in
MMEngine's root ``HOOKS`` (a plain ``import cbn_plugin`` does not). The tools
(``tools/train.py``, ``test.py``, ``precise_cbn.py``) import it and add the hook
to every config; a config run by other means lists it::

    custom_imports = dict(imports=['cbn_plugin', 'cbn_plugin.engine'])
    custom_hooks = [..., dict(type='WeightsOnlyCheckpointHook')]

One concept per module: :mod:`.codec` (weights_only encoding), :mod:`.files`
(file checks, atomic writes), :mod:`.seed` (the resumed run's seed),
:mod:`.rank_state` (per-rank buffers), :mod:`.hook` (the hook),
:mod:`.switches` (config switches); the RNG states are the core's
:mod:`cbn_plugin.rng`. The engine imports the core, never the other way. What
the tools share (command line, config loading, launchers) is
``tools/launch_support.py``. Design notes: ``docs/checkpoints.md``.
"""
from mmengine.registry import HOOKS

from .codec import (FORMAT, FORMAT_KEY, TAG, decode, decode_checkpoint, encode,
                    encode_checkpoint, load_checkpoint)
from .files import (PARTIAL_SUFFIX, CheckpointFileError, atomic_save_checkpoint,
                    check_checkpoint_file, checkpoint_to_resume, save_checkpoint_file)
from .hook import WeightsOnlyCheckpointHook
from .rank_state import (RANK_STATES_FORMAT, RANK_STATES_KEY, empty_cbn_windows,
                         rank_local_buffers, rank_local_norms)
from ..rng import RNG_FORMAT, RNG_KEY, get_rng_state, set_rng_state
from .seed import adopt_checkpoint_seed, read_checkpoint_meta
from .switches import CONFIG_SWITCHES, add_weights_only_hook


def register() -> None:
    """Register ``'WeightsOnlyCheckpointHook'`` in MMEngine's root ``HOOKS`` (idempotent).

    Every OpenMMLab scope (mmdet, mmseg) searches this root registry too.
    """
    if HOOKS.module_dict.get('WeightsOnlyCheckpointHook') is not WeightsOnlyCheckpointHook:
        HOOKS.register_module('WeightsOnlyCheckpointHook', module=WeightsOnlyCheckpointHook,
                              force=True)


register()

__all__ = ['CONFIG_SWITCHES', 'FORMAT', 'FORMAT_KEY', 'PARTIAL_SUFFIX', 'RANK_STATES_FORMAT',
           'RANK_STATES_KEY', 'RNG_FORMAT', 'RNG_KEY', 'TAG', 'CheckpointFileError',
           'WeightsOnlyCheckpointHook', 'add_weights_only_hook', 'adopt_checkpoint_seed',
           'atomic_save_checkpoint', 'check_checkpoint_file', 'checkpoint_to_resume', 'decode',
           'decode_checkpoint', 'empty_cbn_windows', 'encode', 'encode_checkpoint',
           'get_rng_state', 'load_checkpoint', 'rank_local_buffers', 'rank_local_norms',
           'read_checkpoint_meta', 'register', 'save_checkpoint_file', 'set_rng_state']
