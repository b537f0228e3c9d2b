"""Which norm layers share their statistics over the process group.

A synchronised norm (SyncCBN, torch's and mmcv's SyncBatchNorm) reduces its
batch statistics over the processes, so its state is the same on every rank;
every other norm keeps its own. ``PreciseCBNHook`` pools a synchronised
layer's statistics over the group as training did, and the checkpoint kit
(:mod:`cbn_plugin.engine`) stores only the other norms' buffers per rank.
"""
from __future__ import annotations

import torch

from .layer import SyncCrossIterationBatchNorm2d


def is_sync_norm(module) -> bool:
    """Norms whose statistics are reduced over the process group: identical on every rank."""
    if isinstance(module, (torch.nn.SyncBatchNorm, SyncCrossIterationBatchNorm2d)):
        return True
    try:
        from mmcv.ops import SyncBatchNorm as MMCVSyncBatchNorm
    except ImportError:  # mmcv without its compiled ops
        return False
    return isinstance(module, MMCVSyncBatchNorm)
