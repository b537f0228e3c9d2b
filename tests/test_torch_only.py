"""The plugin's core with torch alone: no mmcv, mmengine, mmdet or mmseg.

The GPU machine the GPU check runs on (``tools/analysis_tools/gpu_check.py``) has torch
and no OpenMMLab package. A child process whose imports of those packages raise (a
``sys.meta_path`` finder: ``tests/without_openmmlab.py``) imports ``cbn_plugin`` and its
core modules, converts a
conv+BN model to CBN with the plugin's converter, binds it and trains past burn-in; the
integration's names raise an ImportError that names mmengine. The same script against
a copy of the package with an mmengine import at the top of a core module fails.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WITHOUT = ROOT / 'tests' / 'without_openmmlab.py'

CHILD = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    import importlib

    import torch
    from torch import nn

    import cbn_plugin
    assert cbn_plugin.__file__.startswith(sys.argv[1]), cbn_plugin.__file__
    for name in ('layer', 'functional', 'window', 'binding', 'convert', 'options', 'sync',
                 'plain_bn', 'versions'):
        importlib.import_module(f'cbn_plugin.{name}')
    from without_openmmlab import loaded
    assert not loaded(), loaded()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                          nn.BatchNorm2d(8))
    model = cbn_plugin.convert_bn_to_cbn(model, window_size=3)
    layers = cbn_plugin.cbn_layers(model)
    assert len(layers) == 2
    for _, layer in layers:
        layer.set_schedule(burn_in_steps=2)
    cbn_plugin.bind(model)  # the default logger, without mmengine's print_log
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(6):  # 2 steps of burn-in, then the window
        loss = model(torch.randn(2, 3, 8, 8) + 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cbn_plugin.step(model)
        assert torch.isfinite(loss)
    for _, layer in layers:
        assert layer.steps_done == 6 and int(layer.window_filled.min()) == 2
        assert bool(layer.window_valid.all())
    try:
        cbn_plugin.CBNHook
    except ImportError as exc:
        assert 'mmengine' in str(exc), exc
    else:
        raise AssertionError('CBNHook without mmengine did not raise')
    print('TORCH-ONLY OK')
''')


def run_child(package_root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """CHILD run through tests/without_openmmlab.py, the package from ``package_root``."""
    child = tmp_path / 'torch_only_child.py'
    child.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run([sys.executable, str(WITHOUT), str(child), str(package_root)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_core_imports_and_trains_with_torch_alone(tmp_path):
    done = run_child(ROOT, tmp_path)
    assert done.returncode == 0 and 'TORCH-ONLY OK' in done.stdout, done.stderr[-3000:]


def test_an_openmmlab_import_in_the_core_fails_the_check(tmp_path):
    """Mutation check: an mmengine import at the top of a core module is caught."""
    shutil.copytree(ROOT / 'cbn_plugin', tmp_path / 'cbn_plugin',
                    ignore=shutil.ignore_patterns('__pycache__'))
    window = tmp_path / 'cbn_plugin' / 'window.py'
    text = window.read_text()
    window.write_text(text.replace('import torch\n', 'import torch\nimport mmengine\n', 1))
    done = run_child(tmp_path, tmp_path)
    assert done.returncode != 0 and 'blocked: mmengine' in done.stderr, done.stderr[-3000:]


def test_the_integration_is_there_with_mmengine():
    """With mmengine installed, importing the package registers the hook and the norms."""
    import cbn_plugin
    from mmengine.registry import HOOKS, MODELS
    assert HOOKS.get('CBNHook') is cbn_plugin.CBNHook
    assert MODELS.get('CBN') is cbn_plugin.CBN
    assert 'CBNHook' in cbn_plugin.__all__
