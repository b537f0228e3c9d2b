"""The versions of torch and the OpenMMLab packages this plugin supports, checked at import.

``SUPPORTED`` is the one table of ranges: ``setup.cfg``'s ``install_requires``
and ``extras_require`` say the same (``tests/test_install.py`` checks that
they agree). They are what the code needs, not what it was last run with:
the exact, tested stack is pinned in ``constraints.txt``, which
``tools/install_env.sh`` installs. Why each bound:

- torch >= 2.1: mmcv 2.1.0's prebuilt CUDA wheels serve torch 2.0 and 2.1;
  2.1 is what the oldest test lane runs (``make test-oldest``, torch 2.1.2,
  ``constraints-oldest.txt``), 2.0 is not tested (and lacks
  ``torch._foreach_copy_``, which the layer calls). The calls whose form
  changed inside the range go through :mod:`cbn_plugin.compat`.
  ``Optimizer.register_step_post_hook``
  (``CBNHook`` advances the windows after each real optimizer step) is 2.0's;
  ``torch.batch_norm_update_stats``, ``torch.nn.grad.conv2d_weight`` and
  ``aten.native_batch_norm_backward`` are older. From torch 2.6,
  ``torch.load`` defaults to ``weights_only=True``: that is what makes
  ``cbn_plugin.engine.load_checkpoint`` a safe load. Older torch
  loads the same files with full unpickling. No upper bound: torch is left
  to the user (a CUDA build of their own).
- mmengine >= 0.10.3, < 1.0.0: the oldest test lane runs 0.10.3. Resume is
  part of what the plugin promises, and before 0.10.3 MMEngine's
  ``IterBasedTrainLoop`` resumes without skipping the batches the checkpoint
  had already trained on (its "Advance dataloader" step is 0.10.3's): with
  0.8.0 the digits detector resumed at iteration 100 trained on other images
  and logged another loss at 101 (0.908 against 1.221). Epoch-based resume
  was exact with 0.8.0; with 0.7.1 the checkpoint tests of the saved ``meta``
  iteration and of the atomic rewrite failed (MMDetection 3.3 itself asks
  for >= 0.7.1).
- mmcv >= 2.1.0, < 2.2.0: MMCV 2.x builds norms through MMEngine's
  ``MODELS`` registry, where the plugin registers ``'CBN'``; MMDetection 3.x
  and MMSegmentation 1.x import with no mmcv of 2.2 or later. 2.1.0 is the
  release both test lanes build (its wheels serve torch 2.0-2.1); the 2.0.x
  releases, which MMDetection 3.3 still accepts, are not tested.
- mmdet >= 3.3.0, < 4.0.0 and mmsegmentation >= 1.2.2, < 2.0.0 (optional,
  checked only when installed): the MMCV 2.x / MMEngine generation whose
  configs and registries the plugin's configs use (``mmdet::``, ``mmseg::``
  bases); the floors are the releases both lanes run (the last of each line;
  mmdet 3.0-3.1 refuse mmcv 2.1, and 3.2 and mmseg 1.0-1.2.1 are not tested).

What is tested is the newest and the oldest point of these ranges: the stacks
pinned in the repository's ``constraints.txt`` (``make test``) and
``constraints-oldest.txt`` (``make test-oldest``). ``import cbn_plugin`` raises
:class:`UnsupportedVersionError` for an installed version outside these
ranges, naming it and the supported range, as MMDetection's own
``__init__`` does. Set ``CBN_PLUGIN_SKIP_VERSION_CHECK=1`` to try another
version at your own risk.
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
from typing import Mapping, NamedTuple

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version


class Requirement(NamedTuple):
    """One supported package: its distribution names, import name and version range."""

    distributions: tuple[str, ...]  # the first is the one setup.cfg names
    module: str
    specifier: str  # PEP 440, as in setup.cfg
    required: bool  # in install_requires (True) or an extra (False)


SUPPORTED: dict[str, Requirement] = {
    'torch': Requirement(('torch',), 'torch', '>=2.1', True),
    'mmengine': Requirement(('mmengine', 'mmengine-lite'), 'mmengine', '>=0.10.3,<1.0.0', True),
    'mmcv': Requirement(('mmcv', 'mmcv-full', 'mmcv-lite'), 'mmcv', '>=2.1.0,<2.2.0', True),
    'mmdet': Requirement(('mmdet',), 'mmdet', '>=3.3.0,<4.0.0', False),
    'mmsegmentation': Requirement(('mmsegmentation',), 'mmseg', '>=1.2.2,<2.0.0', False),
}

SKIP_ENV = 'CBN_PLUGIN_SKIP_VERSION_CHECK'


class UnsupportedVersionError(ImportError):
    """An installed torch/OpenMMLab version outside :data:`SUPPORTED`."""


def installed_version(name: str) -> str | None:
    """The installed version of ``SUPPORTED[name]``, ``None`` when it is not installed.

    An already imported module's ``__version__`` wins (what really runs, as
    MMDetection reads ``mmcv.__version__``); otherwise the distribution's
    metadata, so that nothing heavy (mmdet, mmseg) is imported for the check.
    """
    req = SUPPORTED[name]
    module = sys.modules.get(req.module)
    version = getattr(module, '__version__', None)
    if isinstance(version, str):
        return version
    for dist in req.distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def in_range(version: str, specifier: str) -> bool:
    """Whether ``version`` satisfies the PEP 440 ``specifier`` (pre-releases and local
    versions such as ``2.13.0+cpu`` included)."""
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    # A local label (+cpu, +cu121) does not change which release it is.
    return SpecifierSet(specifier, prereleases=True).contains(Version(parsed.public))


def check_versions(versions: Mapping[str, str | None] | None = None) -> None:
    """Raise :class:`UnsupportedVersionError` if an installed package is out of range.

    ``versions`` maps names of :data:`SUPPORTED` to version strings (``None``:
    not installed); by default :func:`installed_version` of each. Packages
    that are not installed are not checked (mmengine and torch are imported
    by the plugin anyway; mmcv, mmdet and mmsegmentation are only needed by
    the codebases that build the models).
    """
    if os.environ.get(SKIP_ENV, '') not in ('', '0'):
        return
    bad = []
    for name, req in SUPPORTED.items():
        version = versions.get(name) if versions is not None else installed_version(name)
        if version is not None and not in_range(version, req.specifier):
            bad.append(f'{req.module} {version} is installed, cbn_plugin supports '
                       f'{req.distributions[0]}{req.specifier}')
    if bad:
        from . import __version__
        raise UnsupportedVersionError(
            f'cbn_plugin {__version__}: unsupported package version(s): ' + '; '.join(bad) +
            '. Install versions in these ranges (the tested stack is pinned in the '
            f"repository's constraints.txt), or set {SKIP_ENV}=1 to import anyway.")
