"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) for OpenMMLab.

Importing the package registers ``'CBN'`` and ``'SyncCBN'`` in MMEngine's
``MODELS`` registry (and ``CBNHook``, ``WeightsOnlyCheckpointHook`` in ``HOOKS``),
the one ``mmcv.cnn.build_norm_layer`` searches, so configs can say
``norm_cfg=dict(type='CBN')`` after ``custom_imports=dict(imports=['cbn_plugin'])``.
"""
from . import checkpoint  # noqa: F401  (registers WeightsOnlyCheckpointHook)
from .binding import bind, cbn_layers, step
from .convert import convert_bn_to_cbn, convert_sync_cbn, convert_to_bn
from .hook import CBNHook
from .layer import CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d
from .registry import register

CBN = CrossIterationBatchNorm2d
SyncCBN = SyncCrossIterationBatchNorm2d
register()

__all__ = ['CBN', 'CBNHook', 'CrossIterationBatchNorm2d', 'SyncCBN',
           'SyncCrossIterationBatchNorm2d', 'bind', 'cbn_layers', 'convert_bn_to_cbn',
           'convert_sync_cbn', 'convert_to_bn', 'step']
__version__ = '0.1.0'
