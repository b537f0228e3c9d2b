"""Deprecated: the checkpoint kit is :mod:`cbn_plugin.engine` (``docs/checkpoints.md``).

Kept for one release so that ``from cbn_plugin.checkpoint import ...`` and
``custom_imports=dict(imports=['cbn_plugin.checkpoint'])`` keep working; importing
it registers ``WeightsOnlyCheckpointHook`` as ``cbn_plugin.engine`` does. Import
``cbn_plugin.engine`` instead.
"""
import warnings

from .engine import *  # noqa: F401,F403
from .engine import __all__  # noqa: F401

warnings.warn('cbn_plugin.checkpoint is deprecated and goes in the next release: import '
              'cbn_plugin.engine (custom_imports=dict(imports=[\'cbn_plugin\', '
              '\'cbn_plugin.engine\']))', DeprecationWarning, stacklevel=2)
