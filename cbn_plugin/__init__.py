"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) for OpenMMLab.

Importing the package registers ``'CBN'`` and ``'SyncCBN'`` in MMEngine's
``MODELS`` registry (and ``CBNHook``, ``PreciseCBNHook`` in ``HOOKS``),
the one ``mmcv.cnn.build_norm_layer`` searches, so configs can say
``norm_cfg=dict(type='CBN')`` after ``custom_imports=dict(imports=['cbn_plugin'])``;
the two-pass training loops (``TwoPassEpochBasedTrainLoop``, ``TwoPassIterBasedTrainLoop``)
go into ``LOOPS``.
The checkpoint hooks the tools use (one per concern, or ``WeightsOnlyCheckpointHook``) are
in ``cbn_plugin.engine``, imported on its own (``docs/checkpoints.md``).
"""
__version__ = '0.1.0'

# Before anything imports mmengine: a clear error for an mmcv/mmengine/mmdet/mmseg
# (or torch) outside the supported ranges (cbn_plugin/versions.py).
from .versions import check_versions

check_versions()

from .binding import bind, cbn_layers, statistics_pass, step  # noqa: E402
from .convert import convert_bn_to_cbn, convert_sync_cbn, convert_to_bn  # noqa: E402
from .hook import CBNHook  # noqa: E402
from .layer import CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d  # noqa: E402
from .loops import TwoPassEpochBasedTrainLoop, TwoPassIterBasedTrainLoop  # noqa: E402,F401
from .options import derived_window_size  # noqa: E402
from .precise_bn import PreciseCBNHook, recompute_statistics  # noqa: E402
from .registry import register  # noqa: E402

CBN = CrossIterationBatchNorm2d
SyncCBN = SyncCrossIterationBatchNorm2d
register()

__all__ = ['CBN', 'CBNHook', 'CrossIterationBatchNorm2d', 'PreciseCBNHook', 'SyncCBN',
           'SyncCrossIterationBatchNorm2d', 'bind', 'cbn_layers', 'convert_bn_to_cbn',
           'convert_sync_cbn', 'convert_to_bn', 'derived_window_size', 'recompute_statistics',
           'statistics_pass', 'step']
