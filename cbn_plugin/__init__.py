"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) for OpenMMLab.

Importing the package registers ``'CBN'`` in MMEngine's ``MODELS`` registry,
the one ``mmcv.cnn.build_norm_layer`` searches, so configs can say
``norm_cfg=dict(type='CBN')`` after ``custom_imports=dict(imports=['cbn_plugin'])``.
"""
from .binding import bind, cbn_layers, step
from .convert import convert_bn_to_cbn, convert_to_bn
from .hook import CBNHook
from .layer import CrossIterationBatchNorm2d
from .registry import register

CBN = CrossIterationBatchNorm2d
register()

__all__ = ['CBN', 'CBNHook', 'convert_bn_to_cbn', 'convert_to_bn', 'CrossIterationBatchNorm2d', 'bind', 'cbn_layers', 'step']
__version__ = '0.1.0'
