"""The torch calls whose form differs across the supported range (``torch>=2.1``), in one place.

Pure torch, no mmcv/mmdet import. Each function is the native API where the
installed torch has it, and its older equivalent otherwise; the comment names
the torch release that brought the native form, so that a shim goes once the
floor in ``versions.SUPPORTED`` reaches it and its call sites call torch
directly. Calls the whole range has natively are not wrapped here:
``torch._foreach_copy_`` (torch 2.1), ``torch.batch_norm_update_stats``,
``Optimizer.register_step_post_hook`` (torch 2.0).

The second test lane (``make test-oldest``, ``constraints-oldest.txt``) runs
the older branch of each on torch 2.1.2; ``tests/test_compat.py`` checks both
answers against what they mean.
"""
from __future__ import annotations

import torch
from torch.fx import _symbolic_trace

__all__ = ['is_autocast_enabled', 'is_fx_symbolic_tracing']


def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled('cpu')
    except TypeError:  # before torch 2.4: "takes no arguments (1 given)"
        return False
    return True


_AUTOCAST_TAKES_DEVICE = _autocast_takes_device()

if hasattr(_symbolic_trace, 'is_fx_symbolic_tracing'):
    # torch >= 2.9: True under torch.fx.symbolic_trace only, not under torch.export /
    # torch.compile (which since then also run the module's Python under an FX tracer).
    is_fx_symbolic_tracing = _symbolic_trace.is_fx_symbolic_tracing
else:
    def is_fx_symbolic_tracing() -> bool:
        """Whether ``torch.fx.symbolic_trace`` is tracing the caller.

        Before torch 2.9 the flag behind ``is_fx_tracing()`` is set by
        ``Tracer.trace`` alone, and torch.compile does not run a module's
        Python under it: the same answer.
        """
        return _symbolic_trace.is_fx_tracing()


def is_autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``'cuda'``, ``'cpu'``, ...) in this thread.

    ``torch.is_autocast_enabled(device_type)`` from torch 2.4; before it,
    ``torch.is_autocast_enabled()`` takes no argument and answers for CUDA
    only, and each other device has its own function
    (``torch.is_autocast_cpu_enabled()``, ``..._xpu_...``, ...).
    """
    if _AUTOCAST_TAKES_DEVICE:
        return torch.is_autocast_enabled(device_type)
    if device_type == 'cuda':
        return torch.is_autocast_enabled()
    per_device = getattr(torch, f'is_autocast_{device_type}_enabled', None)
    # A device with no autocast function of its own has no autocast to be on.
    return bool(per_device is not None and per_device())
