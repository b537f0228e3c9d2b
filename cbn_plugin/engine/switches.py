"""Top-level config switches of the checkpoint kit, one per part.

:func:`add_weights_only_hook` appends ``WeightsOnlyCheckpointHook`` to a
config's ``custom_hooks`` with the parts its switches turn off; the tools call
it on every config. See ``docs/checkpoints.md`` (Switches).
"""
from __future__ import annotations

from .hook import WeightsOnlyCheckpointHook


# Top-level config keys -> WeightsOnlyCheckpointHook arguments (all default True).
CONFIG_SWITCHES = {
    'weights_only_checkpoints': 'encode',
    'resume_rng_state': 'restore_rng',
    'resume_rank_states': 'rank_states',
    'atomic_checkpoints': 'atomic_save',
    'check_checkpoint_files': 'check_files',
}


def add_weights_only_hook(cfg) -> bool:
    """Append ``dict(type='WeightsOnlyCheckpointHook', ...)`` to ``cfg.custom_hooks``.

    The hook's parts follow the config's top-level switches (each ``True``
    unless the config sets it ``False``):

    =============================  ===============================================
    ``weights_only_checkpoints``   encode checkpoints so ``torch.load``'s default
                                   ``weights_only=True`` reads them
    ``resume_rng_state``           save every rank's RNG states and restore them on
                                   resume (and adopt the checkpoint's seed in
                                   ``tools/train.py`` when the config sets none)
    ``resume_rank_states``         save every rank's own norm buffers (CBN windows,
                                   BN running statistics) and restore each rank's
    ``atomic_checkpoints``         write checkpoint files atomically
    ``check_checkpoint_files``     check a checkpoint file before loading it
    =============================  ===============================================

    Nothing is added when the hook is already listed; a switch set in the
    config that contradicts the listed hook's own argument is an error.
    Raises ``ValueError`` for a switch that is not ``True``/``False``.
    Returns whether the hook was added.
    """
    args = {}
    for key, arg in CONFIG_SWITCHES.items():
        value = cfg.get(key, True)
        if not isinstance(value, bool):
            raise ValueError(f'config {key}={value!r}: must be True or False '
                             f'(WeightsOnlyCheckpointHook {arg}=...)')
        if value is False:
            args[arg] = False
    hooks = list(cfg.get('custom_hooks', None) or [])
    for hook in hooks:
        kind = hook.get('type') if isinstance(hook, dict) else type(hook)
        if kind is WeightsOnlyCheckpointHook or (
                isinstance(kind, str) and kind.split('.')[-1] == 'WeightsOnlyCheckpointHook'):
            for key, arg in CONFIG_SWITCHES.items():
                listed = hook.get(arg, True) if isinstance(hook, dict) else getattr(hook, arg)
                if key in cfg and cfg[key] != listed:
                    raise ValueError(
                        f'config {key}={cfg[key]!r} contradicts the '
                        f'WeightsOnlyCheckpointHook listed in custom_hooks ({arg}={listed!r}): '
                        'set it in one place')
            return False
    hooks.append(dict(type='WeightsOnlyCheckpointHook', **args))
    cfg.custom_hooks = hooks
    return True
