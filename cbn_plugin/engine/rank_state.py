"""Per-rank state: what each process of a distributed run keeps for itself.

Under DDP with ``broadcast_buffers=False`` every rank has its own BN running
statistics and CBN windows (:func:`rank_local_norms`); the checkpoint hook
gathers them to the writer (:func:`gather_to_writer`) and each rank loads its
own on resume, or the windows are emptied (:func:`empty_cbn_windows`) when the
world size changed. See ``docs/checkpoints.md`` (Exact resume).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from mmengine.dist import get_rank, get_world_size

from ..rng import RNG_KEY
from ..sync_norms import is_sync_norm

RANK_STATES_KEY = 'rank_states'
RANK_STATES_FORMAT = 1


def unwrap_model(model):
    from mmengine.model import is_model_wrapper
    return model.module if is_model_wrapper(model) else model


def rank_local_norms(model) -> dict[str, torch.nn.Module]:
    """``{name: module}`` of the norms whose buffers each rank keeps for itself.

    Every ``_BatchNorm`` subclass (BN, CBN) that is not a synchronised one:
    DDP with ``broadcast_buffers=False`` (MMEngine's default wrapper, and
    ``tools/train.py``'s on CPU) leaves each rank its own running statistics
    and, for CBN, its own window of its own batches.
    """
    from torch.nn.modules.batchnorm import _BatchNorm
    return {name: m for name, m in unwrap_model(model).named_modules()
            if isinstance(m, _BatchNorm) and not is_sync_norm(m)}


def rank_local_buffers(model) -> dict[str, torch.Tensor]:
    """This rank's buffers of :func:`rank_local_norms`, as CPU copies keyed like ``state_dict``."""
    out = {}
    for name, module in rank_local_norms(model).items():
        prefix = f'{name}.' if name else ''
        for key, value in module.named_buffers(recurse=False):
            if key in module._non_persistent_buffers_set:
                continue
            out[prefix + key] = value.detach().to('cpu', copy=True)
    return out


def sync_shifts(model) -> dict[str, torch.Tensor]:
    """SyncCBN's shift (the previous global mean; the same on every rank), by layer name."""
    from ..layer import SyncCrossIterationBatchNorm2d
    return {name: m.stats_shift.detach().to('cpu', copy=True)
            for name, m in unwrap_model(model).named_modules()
            if isinstance(m, SyncCrossIterationBatchNorm2d) and m.stats_shift is not None}


def gather_to_writer(local: dict) -> list | None:
    """Every rank's ``local`` on rank 0 (a list by rank), ``None`` elsewhere."""
    import torch.distributed as dist
    if get_world_size() == 1:
        return [local]
    gathered = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    return gathered


def empty_cbn_windows(state_dict: dict, model) -> list[str]:
    """Empty the windows of the (not synchronised) CBN layers in ``state_dict``, in place.

    The step counters stay (the burn-in clock goes on); ``window_filled`` and
    ``window_next`` become 0 and the entries 0, so the layer pools nothing
    from the past until new steps are recorded. Returns the layer names.
    """
    from ..layer import CrossIterationBatchNorm2d
    names = []
    for name, module in rank_local_norms(model).items():
        if not isinstance(module, CrossIterationBatchNorm2d):
            continue
        prefix = f'{name}.' if name else ''
        touched = False
        for key in ('window_next', 'window_filled', 'window_mean', 'window_var',
                    'window_grad_mean', 'window_grad_var'):
            value = state_dict.get(prefix + key)
            if isinstance(value, torch.Tensor):
                state_dict[prefix + key] = torch.zeros_like(value)
                touched = True
        if touched:
            names.append(name)
    return names



def rank_states_entry(checkpoint: dict, world: int) -> dict:
    """``checkpoint['rank_states']``, created for ``world`` ranks if absent (in place).

    :class:`.RankStateHook` and :class:`.ResumeRNGHook` each fill in their
    part of every rank's entry (``'buffers'``/``'sync_shifts'``,
    ``'rng_state'``); ``'buffers'`` says whether the norm buffers are there.
    """
    return checkpoint.setdefault(RANK_STATES_KEY, {
        'format': RANK_STATES_FORMAT, 'world_size': world, 'buffers': False,
        'ranks': [{} for _ in range(world)]})


class SavedRanks(NamedTuple):
    """What a checkpoint holds for this rank of this run (:func:`read_rank_states`)."""

    saved: dict | None      # checkpoint['rank_states'], if any
    world: int | None       # the world size it was written with; None: no record
    mine: dict | None       # this rank's entry, when the world sizes match
    why: str | None         # why this rank's own state is not there (None: it is, or 1 process)
    single: bool            # a single-process run resuming a single-process checkpoint


def read_rank_states(checkpoint: dict, world: int, rank: int) -> SavedRanks:
    """This rank's entry of ``checkpoint['rank_states']`` and, when absent, why.

    The world size a checkpoint was written with is ``rank_states``'
    ``world_size``, else its ``rng_state``'s (1 for a checkpoint written by
    one process), else unknown. Raises ``ValueError`` naming the format of a
    ``rank_states`` this version cannot read.
    """
    saved = checkpoint.get(RANK_STATES_KEY)
    rng_state = checkpoint.get(RNG_KEY)
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
        saved_world = None  # written without the plugin's hooks
    mine = saved['ranks'][rank] if saved is not None and saved_world == world else None
    single = world == 1 and saved_world in (None, 1)
    if single or mine is not None:
        why = None
    elif saved_world is None:
        why = 'holds no record of the world size it was written with'
    elif saved_world != world:
        why = f'was written by {saved_world} processes and this run has {world}'
    else:
        why = f"holds only rank 0's state of a {saved_world}-process run"
    return SavedRanks(saved, saved_world, mine, why, single)


def use_rank_buffers(model, state_dict: dict, buffers: dict) -> None:
    """Put this rank's own norm buffers into the ``state_dict`` the model loads (in place)."""
    for name, module in rank_local_norms(model).items():
        prefix = f'{name}.' if name else ''
        for key in module._buffers:  # also the buffers that are None (no step yet)
            if prefix + key not in buffers:
                state_dict.pop(prefix + key, None)  # None on this rank (no step yet)
    state_dict.update(buffers)


def restore_sync_shifts(model, shifts: dict) -> None:
    """Give every SyncCBN layer named in ``shifts`` its saved shift (the previous global mean)."""
    from ..layer import SyncCrossIterationBatchNorm2d
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, SyncCrossIterationBatchNorm2d) and name in shifts:
            module.stats_shift = shifts[name].to(_device_of(module))


def _device_of(module) -> torch.device:
    """Where a norm layer keeps its state: its first parameter's or buffer's device."""
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return tensor.device
    return torch.device('cpu')
