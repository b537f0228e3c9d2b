"""Conversions between CBN and plain BatchNorm, in the spirit of detectron2's helpers.

``convert_to_bn`` is for export and deployment: at inference a CBN layer is a
BatchNorm2d with the same affine parameters and running statistics, so the
converted model gives identical eval outputs and needs no plugin.
``convert_bn_to_cbn`` turns a model built with plain BN into a CBN model.
``convert_sync_cbn`` is the cross-device conversion: torch's and mmengine's
``convert_sync_batchnorm`` turn *every* ``_BatchNorm`` subclass, CBN
included, into plain SyncBN; this one turns CBN into SyncCBN instead.
"""
from __future__ import annotations

import torch
from torch import nn

from .layer import WINDOW_BUFFERS, CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d


def _copy_norm_state(src: nn.modules.batchnorm._BatchNorm, dst) -> None:
    dst.train(src.training)
    with torch.no_grad():
        for name in ('weight', 'bias'):
            if getattr(src, name) is not None:
                getattr(dst, name).copy_(getattr(src, name))
                getattr(dst, name).requires_grad_(getattr(src, name).requires_grad)
        for name in ('running_mean', 'running_var', 'num_batches_tracked'):
            if getattr(src, name) is not None:
                getattr(dst, name).copy_(getattr(src, name))


def _norm_args(module: nn.modules.batchnorm._BatchNorm) -> dict:
    """``module``'s BN constructor arguments, on its device and dtype."""
    ref = module.weight if module.weight is not None else module.running_mean
    return dict(num_features=module.num_features, eps=module.eps, momentum=module.momentum,
                affine=module.affine, track_running_stats=module.track_running_stats,
                device=None if ref is None else ref.device,
                dtype=None if ref is None else ref.dtype)


def _replace(module: nn.Module, make) -> nn.Module:
    new = make(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        replaced = _replace(child, make)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def convert_to_bn(model: nn.Module) -> nn.Module:
    """Replace every CBN layer by an ``nn.BatchNorm2d`` with the same parameters and
    running statistics (in place where possible; returns the model)."""
    def make(module):
        if not isinstance(module, CrossIterationBatchNorm2d):
            return None
        bn = nn.BatchNorm2d(**_norm_args(module))
        _copy_norm_state(module, bn)
        module.attach(None)  # drop the hook on the conv
        return bn
    return _replace(model, make)


def convert_bn_to_cbn(model: nn.Module, **cbn_kwargs) -> nn.Module:
    """Replace every plain ``nn.BatchNorm2d`` (not SyncBN, not CBN) by a CBN layer with
    the same parameters and running statistics; ``cbn_kwargs`` are CBN's arguments
    (``window_size``, ``rho``, ...). Bind the result before training."""
    def make(module):
        if type(module) is not nn.BatchNorm2d:
            return None
        cbn = CrossIterationBatchNorm2d(**_norm_args(module), **cbn_kwargs)
        _copy_norm_state(module, cbn)
        return cbn
    return _replace(model, make)


def convert_sync_cbn(model: nn.Module, process_group=None) -> nn.Module:
    """CBN -> SyncCBN (window state kept) and plain ``nn.BatchNorm2d`` -> ``nn.SyncBatchNorm``.

    Bind the result (``cbn_plugin.bind`` or the CBN hook) before training.
    """
    def make(module):
        if type(module) is CrossIterationBatchNorm2d:
            sync = SyncCrossIterationBatchNorm2d(
                **_norm_args(module), rho=module.rho,
                window_size=module.window_size if module.window_size_given else None,
                variance_rule=module.variance_rule, running_stats=module.running_stats,
                stats_backward=module.stats_backward, compensation=module.compensation,
                per_call_windows=module.per_call_windows, accumulation=module.accumulation,
                process_group=process_group)
            sync.load_state_dict(module.state_dict())  # the window buffers too
            _copy_norm_state(module, sync)  # training mode, frozen parameters
            sync.set_schedule(module.burn_in_steps, module.ramp_steps)
            module.attach(None)
            return sync
        if type(module) is nn.BatchNorm2d:
            return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        return None
    return _replace(model, make)


def strip_window_state(state_dict: dict) -> tuple[dict, list[str]]:
    """A CBN checkpoint's state_dict as a plain BN one: the window buffers removed.

    Returns the new dict and the removed keys.
    """
    names = tuple('.' + name for name in WINDOW_BUFFERS)
    removed = [k for k in state_dict if k.endswith(names)]
    return {k: v for k, v in state_dict.items() if k not in removed}, removed
