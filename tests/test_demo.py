"""The detection demo: its dataset generator, configs, and `make demo`'s code path.

The runs go through ``tools/demo.py`` itself (a subprocess, the code path of
``make demo``) in the small-batch study's ``--tiny`` setting. The demo imports nothing
from the study: its committed configs are checked against the configs the study builds.
"""
from __future__ import annotations

import filecmp
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))
sys.path.insert(0, str(REPO / 'tools' / 'analysis_tools'))

import demo as demo_tool  # noqa: E402
import make_digits_det  # noqa: E402
import small_batch_detection as study  # noqa: E402

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
def test_partial_norm_configs_build_with_the_norm_in_fpn_and_box_head(norm):
    """configs/demo/: the earlier demo's detector (the norm in FPN and box head only),
    trainable with tools/train.py; the small-batch configs build on its base."""
    import cbn_plugin  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    register_all_modules()  # default scope 'mmdet', as the configs say
    cfg = Config.fromfile(str(REPO / 'configs' / 'demo' /
                              f'faster-rcnn_r18-w32_fpn_4conv1fc-{norm}_digits.py'))
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


def _run(cmd, timeout=600):
    out = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log


DEMO_CONFIGS = {  # config -> the study's setting it runs in (its command-line options)
    demo_tool.DEFAULT_CONFIG: [],
    demo_tool.CONFIGS / 'faster-rcnn_r18-w32_fpn_4conv1fc-bn-all_1xb1-2400img_digits.py': [],
    demo_tool.TINY_CONFIG: ['--tiny'],
}


@pytest.mark.parametrize('path', list(DEMO_CONFIGS), ids=lambda p: p.stem)
def test_each_demo_config_is_the_studys_run_of_its_row(path, tmp_path):
    """The demo trains a committed config and imports nothing from the study; this is what
    makes its run one run of the comparison: the study builds the same config for the row
    and setting the config names (what the Runner reads: model, data, schedule, hooks)."""
    data, work = tmp_path / 'data', tmp_path / 'work'
    mine = demo_tool.load_config(path, data, work, seed=3)
    setting = mine.demo.setting.to_dict()
    assert setting == study.setting_from_args(study.parse_args(DEMO_CONFIGS[path]))
    job = study.make_job(mine.demo.row, setting, 3, data, work)
    assert mine.demo.label == job['label']
    theirs = study.build_config(dict(job, work_dir=str(work))).to_dict()
    mine = mine.to_dict()
    # 'demo' names the run; norm_cfg is a variable of the files (the model dicts hold it).
    keys = (set(mine) | set(theirs)) - {'demo', 'norm_cfg'}
    assert {'model', 'train_dataloader', 'train_cfg', 'param_scheduler', 'optim_wrapper',
            'randomness', 'work_dir'} <= keys
    for key in sorted(keys):
        assert mine.get(key) == theirs.get(key), key


def test_demo_and_study_write_and_find_the_same_data(tmp_path):
    setting = study.setting_from_args(study.parse_args(['--tiny']))
    path = demo_tool.write_data(tmp_path, setting)
    assert study.ensure_data(tmp_path, setting) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # found, not rewritten
    assert len(list((path / 'train').glob('*.png'))) == setting['num_train']


@pytest.fixture(scope='module')
def tiny_committed(tmp_path_factory):
    """A committed comparison in the study's --tiny setting (BN and CBN at 1 image, BN at
    the large batch), as `make demo-compare` writes one in the real setting."""
    root = tmp_path_factory.mktemp('demo')
    _run(['tools/analysis_tools/small_batch_detection.py', '--tiny', '--workers', '1',
          '--rows', 'bn-large', 'bn', 'cbn', '--out-dir', root / 'docs',
          '--data-root', root / 'data', '--work-dir', root / 'study'])
    return root


def test_demo_reproduces_the_committed_row_and_prints_the_others(tiny_committed):
    """`make demo`'s code path (tools/demo.py, a subprocess) in the study's --tiny setting:
    it trains its committed config, the study's CBN-defaults row, loss for loss like the
    committed seed-0 run, and prints its mAP beside the committed rows with the command
    that regenerates them."""
    root = tiny_committed
    run = json.loads((root / 'docs' / 'small_batch_detection.json').read_text())
    committed = {r['job']['row']: r for r in run['results']}
    log = _run(['tools/demo.py', '--tiny', '--committed',
                root / 'docs' / 'small_batch_detection.json', '--data-root', root / 'data',
                '--work-dir', root / 'demo'])
    lines = log[log.index('COCO box mAP on'):].splitlines()
    cells = [re.split(r'\s{2,}', line) for line in lines[2:]
             if line.startswith(('this run ', 'committed '))]
    table = {f'{c[0]}|{c[1]}': c for c in cells}
    mine = json.loads((root / 'demo' / f'{demo_tool.TINY_CONFIG.stem}_s0' /
                       'result.json').read_text())
    # One torch thread, the same seed and config: the same run, loss for loss (the tiny
    # setting's mAP is 0 whatever trained; the loss curve is what tells runs apart).
    assert len(mine['losses']) == committed['cbn']['iters'] == 8
    assert study.loss_curve(mine['losses']) == committed['cbn']['loss_curve']
    assert f'(this run: {mine["mAP"]:.3f})' in log
    assert f'{mine["mAP"]:.3f}' in table['this run|CBN (new defaults)']
    for row, r in committed.items():
        assert f'{r["mAP"]:.3f}' in table[f'committed|{r["job"]["label"]}'], row
    assert 'make demo-compare' in log and run['command'] in log
    # how far another machine may land: the committed spread between seeds of this row
    assert 'On another CPU' in log and 'spread between seeds (0.000 mAP' in log


def test_demo_does_not_compare_another_setting(tiny_committed, tmp_path):
    """The real committed comparison ran the full setting: a --tiny run is not set beside it."""
    log = _run(['tools/demo.py', '--tiny', '--data-root', tiny_committed / 'data',
                '--work-dir', tmp_path])
    assert 'ran another setting' in log and 'not compared' in log
    assert 'committed  ' not in log and 'On another CPU' not in log
    result = json.loads((tmp_path / f'{demo_tool.TINY_CONFIG.stem}_s0' / 'result.json')
                        .read_text())
    assert len(result['losses']) == 8 and all(math.isfinite(x) for x in result['losses'])


def test_demo_sets_the_row_trained_longer_beside_gn_at_equal_compute(tmp_path):
    """The converged comparison's runs, for GN and the demo's row: each budget's means, and
    GN's mAP at the CPU the row spent at the demo's budget, linear on GN's curve through
    its budgets (here 0.5 + (300 - 100) / (500 - 100) x (0.8 - 0.5) = 0.65)."""
    setting = dict(study.SETTING_DEFAULTS, images=2400)

    def result(row, images, seed, mAP, cpu, status='ok'):
        return dict(job=dict(row=row, label=row.upper(), seed=seed,
                             setting=dict(setting, images=images)),
                    status=status, mAP=mAP, cpu_s=cpu)
    runs = [result('gn', 2400, 0, 0.45, 90), result('gn', 2400, 1, 0.55, 110),
            result('gn', 6000, 0, 0.8, 500), result('cbn', 2400, 0, 0.6, 300),
            result('cbn', 6000, 0, 0.1, 999, status='failed'), result('bn', 2400, 0, 0.2, 50)]
    path = tmp_path / 'converged.json'
    path.write_text(json.dumps(dict(command='the study', setting=dict(setting, images=6000),
                                    results=runs)))
    lines = demo_tool.trained_longer(path, setting, 'cbn')
    table = [line.split() for line in lines if 'seed(s)' in line]
    assert [(t[0], t[2], t[6]) for t in table] == [
        ('2,400', 'CBN', '0.600'), ('2,400', 'GN', '0.500'), ('6,000', 'GN', '0.800')]
    assert lines[-1].endswith('GN trained for that CPU: mAP 0.650 on its curve'), lines[-1]
    # beyond GN's budgets: said, not extrapolated; another setting: not compared
    runs[3]['cpu_s'] = 900
    path.write_text(json.dumps(dict(command='the study', setting=setting, results=runs)))
    assert demo_tool.trained_longer(path, setting, 'cbn')[-1].endswith(
        'outside the budgets GN has run')
    other = dict(setting, width=setting['width'] * 2)
    assert 'ran another setting' in demo_tool.trained_longer(path, other, 'cbn')[0]
    # with the rows' CPU per image measured side by side: a run's CPU is images x that
    # (GN 0.1 s: 240 s at 2,400 images, 600 s at 6,000; CBN 0.125 s: 300 s at 2,400, where
    # GN's curve gives 0.5 + (300 - 240) / (600 - 240) x 0.3 = 0.55)
    cost = tmp_path / 'cost.json'
    cost.write_text(json.dumps(dict(setting=setting, results=[
        dict(row='gn', s_per_image=0.1), dict(row='cbn', s_per_image=0.125)])))
    lines = demo_tool.trained_longer(path, setting, 'cbn', cost)
    assert 'measured side by side (cost.json)' in lines[0]
    table = [line.split() for line in lines if 'seed(s)' in line]
    assert [(t[0], t[2], t[10]) for t in table] == [
        ('2,400', 'CBN', '300'), ('2,400', 'GN', '240'), ('6,000', 'GN', '600')]
    assert lines[-1].endswith('GN trained for that CPU: mAP 0.550 on its curve'), lines[-1]
    # a cost json of another setting, or without one of the two rows: the runs' own CPU
    cost.write_text(json.dumps(dict(setting=other, results=[dict(row='gn', s_per_image=0.1),
                                                            dict(row='cbn', s_per_image=0.1)])))
    assert "the runs' own" in demo_tool.trained_longer(path, setting, 'cbn', cost)[0]
