"""Registration with MMEngine's registries (the only place that imports them)."""
from __future__ import annotations

from .layer import CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d


def register() -> None:
    """Register ``'CBN'`` and ``'SyncCBN'`` in MMEngine's root ``MODELS`` (idempotent).

    Every OpenMMLab scope (mmcv, mmdet) searches its parent registries, so the
    root is where ``build_norm_layer(dict(type='CBN'), ...)`` finds it.
    """
    from mmengine.registry import MODELS
    for name, cls in (('CBN', CrossIterationBatchNorm2d),
                      ('SyncCBN', SyncCrossIterationBatchNorm2d)):
        if MODELS.module_dict.get(name) is not cls:
            MODELS.register_module(name, module=cls)
