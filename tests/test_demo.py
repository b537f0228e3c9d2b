"""The embedded detection demo: its dataset generator, configs and a 2-iteration run.

The run goes through ``tools/demo.py`` itself (a subprocess, the code path of
``make demo``), only with a tiny dataset and schedule.
"""
from __future__ import annotations

import filecmp
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))

import make_digits_det  # noqa: E402

SMALL = dict(num_train=6, num_val=3, seed=0)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file())


@pytest.fixture(scope='module')
def small_sets(tmp_path_factory):
    a = tmp_path_factory.mktemp('digits_a')
    b = tmp_path_factory.mktemp('digits_b')
    make_digits_det.build(a, **SMALL)
    make_digits_det.build(b, **SMALL)
    return a, b


def test_generator_is_byte_identical_across_runs(small_sets):
    a, b = small_sets
    files = _tree(a)
    assert files == _tree(b)
    assert 'annotations/train.json' in files and 'annotations/val.json' in files
    assert sum(f.startswith('train/') for f in files) == SMALL['num_train']
    assert sum(f.startswith('val/') for f in files) == SMALL['num_val']
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files)


def test_generator_seed_changes_the_data(tmp_path, small_sets):
    make_digits_det.build(tmp_path, **{**SMALL, 'seed': 1})
    a, _ = small_sets
    first = 'train/000000.png'
    assert (tmp_path / first).read_bytes() != (a / first).read_bytes()


def test_json_loads_in_pycocotools(small_sets):
    from pycocotools.coco import COCO
    from sklearn.datasets import load_digits
    targets = load_digits().target
    root, _ = small_sets
    digits = {}
    for split in make_digits_det.SPLITS:
        coco = COCO(str(root / 'annotations' / f'{split}.json'))
        cats = coco.loadCats(coco.getCatIds())
        assert [c['name'] for c in cats] == [str(d) for d in range(10)]
        assert len(coco.getImgIds()) == SMALL[f'num_{split}']
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) >= 2 * len(coco.getImgIds())  # several digits per canvas
        for ann in anns:
            img = coco.imgs[ann['image_id']]
            x, y, w, h = ann['bbox']
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img['width'] and y + h <= img['height']
            # The class is the source digit's label.
            assert coco.cats[ann['category_id']]['name'] == str(targets[ann['digit_index']])
        digits[split] = {ann['digit_index'] for ann in anns}
    assert not digits['train'] & digits['val']


def test_split_is_by_source_digit_and_covers_all():
    from sklearn.datasets import load_digits
    targets = load_digits().target
    s = make_digits_det.split_sources(targets, 0.2, seed=0)
    assert not set(s['train'].tolist()) & set(s['val'].tolist())
    assert len(s['train']) + len(s['val']) == len(targets) == 1797
    # Stratified: every class is in both splits, about 20 % in val.
    for cls in range(10):
        n_val = int(np.sum(targets[s['val']] == cls))
        assert abs(n_val - 0.2 * np.sum(targets == cls)) <= 1


@pytest.mark.parametrize('norm', ['bn', 'gn', 'naive-cbn', 'cbn', 'cbn-s2', 'cbn-s4'])
def test_demo_configs_build_with_the_norm_in_fpn_and_box_head(norm):
    import cbn_plugin  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    import demo
    register_all_modules()  # default scope 'mmdet', as the configs say
    cfg = Config.fromfile(str(demo.config_path(norm)))
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.model.backbone.init_cfg is None
    model = MODELS.build(cfg.model)
    expected = {'bn': nn.BatchNorm2d, 'gn': nn.GroupNorm,
                'naive-cbn': cbn_plugin.CBN, 'cbn': cbn_plugin.CBN,
                'cbn-s2': cbn_plugin.CBN, 'cbn-s4': cbn_plugin.CBN}[norm]
    for part in (model.neck, model.roi_head.bbox_head):
        norms = [m for m in part.modules() if isinstance(m, (_BatchNorm, nn.GroupNorm))]
        assert norms and all(type(m) is expected for m in norms), part
    assert len([m for m in model.neck.modules() if isinstance(m, expected)]) == 8
    assert len([m for m in model.roi_head.bbox_head.modules() if isinstance(m, expected)]) == 4
    # The backbone's norm is GN in every config; the RPN head has none.
    assert all(isinstance(m, nn.GroupNorm) for m in model.backbone.modules()
               if isinstance(m, (_BatchNorm, nn.GroupNorm)))
    assert not any(isinstance(m, (_BatchNorm, nn.GroupNorm)) for m in model.rpn_head.modules())
    if 'cbn' in norm:
        assert cfg.custom_hooks[0].type == 'CBNHook'
        assert model.neck.fpn_convs[0].norm.rho == (0.0 if norm == 'naive-cbn' else 1.0)
        strides = {m.dvar_stride for m in model.modules() if isinstance(m, cbn_plugin.CBN)}
        assert strides == {dict(s2=2, s4=4).get(norm[4:], 1)}


def test_demo_trains_two_iterations_and_evaluates(tmp_path):
    """``make demo``'s code path with 2 iterations on a 4-image set."""
    cmd = [sys.executable, str(REPO / 'tools' / 'demo.py'), '--max-iters', '2',
           '--num-train', '4', '--num-val', '2', '--log-interval', '1',
           '--data-root', str(tmp_path / 'data'), '--work-dir', str(tmp_path / 'work')]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert 'data: wrote' in log
    assert 'Iter(train) [1/2]' in log and 'Iter(train) [2/2]' in log
    assert 'cbn_window' in log  # the CBN config ran with CBNHook
    assert 'coco/bbox_mAP_50' in log  # mmdet's CocoMetric ran on val
    table = log[log.index('norm (FPN + box head)'):].splitlines()
    row = table[1].split()
    assert row[0] == 'CBN' and row[1] == '2'
    assert all(math.isfinite(float(v)) for v in row[2:5])
    # The demo records what it wrote, so a later run with the same arguments reuses it.
    manifest = json.loads((tmp_path / 'data' / 'demo_manifest.json').read_text())
    assert manifest['num_train'] == 4 and manifest['num_val'] == 2


def test_demo_compare_writes_table_and_plot(tmp_path):
    """``make demo-compare``'s code path, two norms, 2 iterations, into a scratch docs dir."""
    docs = tmp_path / 'docs'
    docs.mkdir()
    (docs / 'demo.md').write_text('# Demo\n\nhand-written text\n\n'
                                  '<!-- demo-compare:begin (written by tools/demo.py --compare; '
                                  'do not edit) -->\nold\n<!-- demo-compare:end -->\n\ntail\n')
    cmd = [sys.executable, str(REPO / 'tools' / 'demo.py'), '--compare', '--norms', 'bn', 'cbn',
           '--max-iters', '2', '--num-train', '4', '--num-val', '2',
           '--data-root', str(tmp_path / 'data'), '--work-dir', str(tmp_path / 'work'),
           '--docs-dir', str(docs)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    text = (docs / 'demo.md').read_text()
    assert 'hand-written text' in text and text.rstrip().endswith('tail')
    assert '\nold\n' not in text and '| BN | 2 |' in text and '| CBN | 2 |' in text
    assert (docs / 'demo_compare.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    saved = tmp_path / 'work' / 'compare_results.json'
    run = json.loads(saved.read_text())
    assert [r['norm'] for r in run['results']] == ['bn', 'cbn']
    assert all(len(r['losses']) == 2 for r in run['results'])
    assert run['command'].startswith('python tools/demo.py --compare --norms bn cbn')
    # Re-rendering the saved run (no training) writes the same section.
    (docs / 'demo_compare.png').unlink()
    (docs / 'demo.md').write_text(text.replace('| BN | 2 |', '| edited |'))
    cmd = [sys.executable, str(REPO / 'tools' / 'demo.py'), '--from-json', str(saved),
           '--docs-dir', str(docs)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert (docs / 'demo.md').read_text() == text
    assert (docs / 'demo_compare.png').is_file()
