"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) for OpenMMLab.

Importing the package registers ``'CBN'`` and ``'SyncCBN'`` in MMEngine's
``MODELS`` registry (and ``CBNHook``, ``PreciseCBNHook`` in ``HOOKS``),
the one ``mmcv.cnn.build_norm_layer`` searches, so configs can say
``norm_cfg=dict(type='CBN')`` after ``custom_imports=dict(imports=['cbn_plugin'])``;
the two-pass training loops (``TwoPassEpochBasedTrainLoop``, ``TwoPassIterBasedTrainLoop``)
go into ``LOOPS``.
The checkpoint hooks the tools use (one per concern, or ``WeightsOnlyCheckpointHook``) are
in ``cbn_plugin.engine``, imported on its own (``docs/checkpoints.md``).

The core (the layers, ``bind``, ``step``, the converters, ``derived_window_size``) needs
torch alone; the OpenMMLab integration above is imported and registered when MMEngine
imports. Without it, asking for a name of the integration (``cbn_plugin.CBNHook``) raises
an ImportError that says so (a GPU machine with torch and no OpenMMLab runs the core:
``tools/analysis_tools/gpu_check.py``).
"""
__version__ = '0.1.0'

# Before anything imports mmengine: a clear error for an mmcv/mmengine/mmdet/mmseg
# (or torch) outside the supported ranges (cbn_plugin/versions.py).
from .versions import check_versions

check_versions()

from .binding import StepTracker, bind, cbn_layers, skip_step, statistics_pass, step  # noqa: E402
from .convert import convert_bn_to_cbn, convert_sync_cbn, convert_to_bn  # noqa: E402
from .layer import CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d  # noqa: E402
from .options import derived_window_size  # noqa: E402

CBN = CrossIterationBatchNorm2d
SyncCBN = SyncCrossIterationBatchNorm2d

__all__ = ['CBN', 'CrossIterationBatchNorm2d', 'StepTracker', 'SyncCBN',
           'SyncCrossIterationBatchNorm2d', 'bind', 'cbn_layers', 'convert_bn_to_cbn',
           'convert_sync_cbn', 'convert_to_bn', 'derived_window_size', 'skip_step',
           'statistics_pass', 'step']

# The OpenMMLab integration: only the import of mmengine itself is optional; once it
# imports, a failure of the integration is an error like any other.
_INTEGRATION = ('CBNHook', 'PreciseCBNHook', 'recompute_statistics', 'register',
                'TwoPassEpochBasedTrainLoop', 'TwoPassIterBasedTrainLoop')
try:
    import mmengine  # noqa: E402,F401
except ImportError as exc:  # torch alone: the core works, the integration says why not
    _MMENGINE_ERROR = exc
else:
    _MMENGINE_ERROR = None
    from .hook import CBNHook  # noqa: E402
    from .loops import TwoPassEpochBasedTrainLoop, TwoPassIterBasedTrainLoop  # noqa: E402,F401
    from .precise_bn import PreciseCBNHook, recompute_statistics  # noqa: E402
    from .registry import register  # noqa: E402
    register()
    __all__ += ['CBNHook', 'PreciseCBNHook', 'recompute_statistics']


def __getattr__(name: str):
    if name in _INTEGRATION and _MMENGINE_ERROR is not None:
        raise ImportError(
            f'cbn_plugin.{name} is part of the OpenMMLab integration and needs mmengine, '
            f'which did not import ({_MMENGINE_ERROR}). Install mmengine (setup.cfg names '
            'the range); the layers, bind, step and the converters need torch alone.'
        ) from _MMENGINE_ERROR
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
