"""Top-level config switches of the checkpoint kit, one per concern.

:func:`add_checkpoint_hooks` appends the checkpoint hooks to a config's
``custom_hooks`` as its switches say (the tools call it on every config);
:func:`add_weights_only_hook` appends the one ``WeightsOnlyCheckpointHook``
instead. See ``docs/checkpoints.md`` (Switches).
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

# Top-level config keys -> (the hook of that concern, its argument the key sets); a
# hook without an argument is left out when its key is False. In the order the
# tools list them (the order WeightsOnlyCheckpointHook runs its parts in).
CONCERN_HOOKS = {
    'check_checkpoint_files': ('CheckpointFileCheckHook', None),
    'atomic_checkpoints': ('AtomicCheckpointHook', None),
    'resume_rank_states': ('RankStateHook', 'save_buffers'),
    'resume_rng_state': ('ResumeRNGHook', None),
    'weights_only_checkpoints': ('CheckpointCodecHook', 'encode'),
}


def _switches(cfg) -> dict:
    """``{config key: bool}`` of the switches; ``ValueError`` for a value not True/False."""
    out = {}
    for key, arg in CONFIG_SWITCHES.items():
        value = cfg.get(key, True)
        if not isinstance(value, bool):
            raise ValueError(f'config {key}={value!r}: must be True or False '
                             f'(WeightsOnlyCheckpointHook {arg}=...)')
        out[key] = value
    return out


def _type_name(hook) -> str | None:
    kind = hook.get('type') if isinstance(hook, dict) else type(hook)
    if isinstance(kind, str):
        return kind.split('.')[-1]
    return getattr(kind, '__name__', None)


def _listed_bundle(cfg, hooks) -> bool:
    """Whether ``hooks`` lists ``WeightsOnlyCheckpointHook``; ``ValueError`` if it contradicts
    a switch set in the config."""
    for hook in hooks:
        if _type_name(hook) != 'WeightsOnlyCheckpointHook':
            continue
        for key, arg in CONFIG_SWITCHES.items():
            listed = hook.get(arg, True) if isinstance(hook, dict) else getattr(hook, arg)
            if key in cfg and cfg[key] != listed:
                raise ValueError(
                    f'config {key}={cfg[key]!r} contradicts the '
                    f'WeightsOnlyCheckpointHook listed in custom_hooks ({arg}={listed!r}): '
                    'set it in one place')
        return True
    return False


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
    switches = _switches(cfg)
    hooks = list(cfg.get('custom_hooks', None) or [])
    if _listed_bundle(cfg, hooks):
        return False
    args = {CONFIG_SWITCHES[key]: False for key, on in switches.items() if not on}
    hooks.append(dict(type='WeightsOnlyCheckpointHook', **args))
    cfg.custom_hooks = hooks
    return True


def add_checkpoint_hooks(cfg) -> list[str]:
    """Append the checkpoint hooks the config's switches leave on to ``cfg.custom_hooks``.

    One hook per concern (:data:`CONCERN_HOOKS`), in that order:
    ``CheckpointFileCheckHook`` and ``AtomicCheckpointHook`` unless their
    switch is ``False``, ``RankStateHook`` (``save_buffers=False`` with
    ``resume_rank_states=False``), ``ResumeRNGHook`` unless
    ``resume_rng_state=False``, ``CheckpointCodecHook`` (``encode=False``
    with ``weights_only_checkpoints=False``). A concern whose hook the
    config lists already is left as listed; nothing is added when it lists
    ``WeightsOnlyCheckpointHook``. A switch set in the config that
    contradicts a listed hook is an error (``ValueError``, naming both), as
    is a switch that is not ``True``/``False``. Returns the types added.
    """
    switches = _switches(cfg)
    hooks = list(cfg.get('custom_hooks', None) or [])
    if _listed_bundle(cfg, hooks):
        return []
    added = []
    for key, (kind, arg) in CONCERN_HOOKS.items():
        listed = [h for h in hooks if _type_name(h) == kind]
        if listed:
            hook = listed[0]
            on = True if arg is None else (
                hook.get(arg, True) if isinstance(hook, dict) else getattr(hook, arg))
            if key in cfg and cfg[key] != on:
                said = f'{arg}={on!r}' if arg is not None else 'listed'
                raise ValueError(f'config {key}={cfg[key]!r} contradicts the {kind} in '
                                 f'custom_hooks ({said}): set it in one place')
            continue
        if switches[key]:
            hooks.append(dict(type=kind))
        elif arg is not None:
            hooks.append(dict(type=kind, **{arg: False}))
        else:
            continue
        added.append(kind)
    if added:
        cfg.custom_hooks = hooks
    return added
