"""Registration with MMEngine's registries (the only place that imports them)."""
from __future__ import annotations

from .layer import CrossIterationBatchNorm2d


def register() -> None:
    """Register ``'CBN'`` in MMEngine's root ``MODELS`` (idempotent).

    Every OpenMMLab scope (mmcv, mmdet) searches its parent registries, so the
    root is where ``build_norm_layer(dict(type='CBN'), ...)`` finds it.
    """
    from mmengine.registry import MODELS
    if MODELS.module_dict.get('CBN') is not CrossIterationBatchNorm2d:
        MODELS.register_module('CBN', module=CrossIterationBatchNorm2d)
