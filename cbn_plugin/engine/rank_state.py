"""Per-rank state: what each process of a distributed run keeps for itself.

Under DDP with ``broadcast_buffers=False`` every rank has its own BN running
statistics and CBN windows (:func:`rank_local_norms`); the checkpoint hook
gathers them to the writer (:func:`gather_to_writer`) and each rank loads its
own on resume, or the windows are emptied (:func:`empty_cbn_windows`) when the
world size changed. See ``docs/checkpoints.md`` (Exact resume).
"""
from __future__ import annotations

import torch
from mmengine.dist import get_rank, get_world_size

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

