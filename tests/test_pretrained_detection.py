"""tools/analysis_tools/pretrained_detection.py: the rows as configs, the committed configs,
resuming, and tiny runs end to end (a baseline probe, and a CBN row for 2 iterations).
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'analysis_tools' / 'pretrained_detection.py'
CONFIGS = REPO / 'configs' / 'pretrained_det'


@pytest.fixture(scope='module')
def ptd():
    spec = importlib.util.spec_from_file_location('pretrained_detection', TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules['pretrained_detection'] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny(ptd, tmp_path_factory):
    """The tiny setting, its data and both tiny pretrained checkpoints (built once)."""
    root = tmp_path_factory.mktemp('ptd')
    args = ptd.parse_args(['--tiny', '--pretrained-root', str(root / 'pre')])
    setting = ptd.setting_from_args(args)
    data = ptd.sbd.ensure_data(root / 'data', setting)
    ckpts = ptd.checkpoints(setting, ['bn', 'gn'], root / 'pre', log=None)
    return dict(root=root, setting=setting, data=data, ckpts=ckpts)


def _model(ptd, job):
    import cbn_plugin  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    return MODELS.build(ptd.build_config(job).model)


def _norms(module):
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    return [m for m in module.modules() if isinstance(m, (_BatchNorm, nn.GroupNorm))]


EXPECTED = {  # row: backbone norm type, trained, neck + head norm type (None: no norm)
    'a': ('BatchNorm2d', False, None), 'b': ('BatchNorm2d', False, 'BatchNorm2d'),
    'c': ('BatchNorm2d', False, 'GroupNorm'),
    'd': ('BatchNorm2d', False, 'CrossIterationBatchNorm2d'),
    'e': ('BatchNorm2d', False, 'CrossIterationBatchNorm2d'),
    'f': ('BatchNorm2d', True, 'BatchNorm2d'),
    'g': ('CrossIterationBatchNorm2d', True, 'CrossIterationBatchNorm2d'),
    'h': ('GroupNorm', True, 'GroupNorm'), 'i': ('BatchNorm2d', True, 'BatchNorm2d')}


@pytest.mark.parametrize('row', list(EXPECTED))
def test_each_row_builds_its_norms_and_loads_its_checkpoint(ptd, tiny, row, tmp_path):
    job = ptd.make_job(row, tiny['setting'], 0, tiny['data'], tmp_path, tiny['ckpts'])
    model = _model(ptd, job)
    model.train()
    backbone_type, trained, head_type = EXPECTED[row]
    backbone = _norms(model.backbone)
    assert {type(m).__name__ for m in backbone} == {backbone_type}
    assert len(backbone) == 1 + 16 + 3  # stem, 8 basic blocks x 2, 3 shortcuts
    # stem and stage 1 are frozen in every row (frozen_stages=1); the rest per row
    later = [m for name, m in model.backbone.named_modules()
             if m in backbone and name.startswith(('layer2', 'layer3', 'layer4'))]
    assert all(m.training == trained for m in later)
    assert all(p.requires_grad == trained for m in later for p in m.parameters())
    assert not any(m.training for m in [model.backbone.norm1] + _norms(model.backbone.layer1))
    head = _norms(model.neck) + _norms(model.roi_head.bbox_head)
    if head_type is None:
        assert head == [] and model.neck.lateral_convs[0].conv.bias is not None
    else:
        assert {type(m).__name__ for m in head} == {head_type} and len(head) == 8 + 4
    ckpt = tiny['ckpts']['gn' if backbone_type == 'GroupNorm' else 'bn']
    assert model.backbone.init_cfg == dict(type='Pretrained', checkpoint=ckpt)
    model.init_weights()
    saved = torch.load(ckpt, map_location='cpu', weights_only=False)['state_dict']
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items())


def test_batch_lr_and_images_seen(ptd, tiny, tmp_path):
    setting = dict(tiny['setting'], images=64, large=8, small=1, lr_per_image=0.01)
    for row in ptd.ROWS:
        job = ptd.make_job(row, setting, 0, tiny['data'], tmp_path, tiny['ckpts'])
        cfg = ptd.build_config(job)
        batch = 8 if row == 'i' else 1
        assert cfg.train_dataloader.batch_size == batch, row
        assert cfg.train_cfg.max_iters * batch == 64, row
        assert cfg.optim_wrapper.optimizer.lr == pytest.approx(0.01 * batch), row
        cbn = 'cbn' in (ptd.ROWS[row]['backbone'], ptd.ROWS[row]['head'])
        assert [h.type for h in cfg.get('custom_hooks', [])] == (['CBNHook'] if cbn else []), row
        if cbn:
            assert job['norm']['cbn_args']['window_size'] == 32  # the README's 32 / batch
            assert '_k32_' in Path(job['work_dir']).name  # another window, another run
    e = ptd.make_job('e', setting, 0, tiny['data'], tmp_path, tiny['ckpts'])
    assert e['norm']['cbn_args'] == dict(mode='paper', window_size=32)
    e8 = ptd.make_job('e', dict(setting, small=2), 0, tiny['data'], tmp_path, tiny['ckpts'])
    assert e8['norm']['cbn_args']['window_size'] == 16
    e4 = ptd.make_job('e', setting, 0, tiny['data'], tmp_path, tiny['ckpts'], window_size=4)
    assert e4['norm']['cbn_args']['window_size'] == 4 and e4['work_dir'] != e['work_dir']


def test_window_zero_is_refused_not_replaced(ptd, tiny, tmp_path):
    with pytest.raises(SystemExit, match=r'--window 0: .*>= 1'):
        ptd.main(['--tiny', '--rows', 'd', '--window', '0', '--out-dir', str(tmp_path)])
    setting = dict(tiny['setting'], small=1)
    job = ptd.make_job('d', setting, 0, tiny['data'], tmp_path, tiny['ckpts'], window_size=1)
    assert job['norm']['cbn_args']['window_size'] == 1


def test_probe_refuses_cbn_rows(ptd, tmp_path):
    with pytest.raises(SystemExit, match=r"\['d'\]"):
        ptd.main(['--tiny', '--probe', '--rows', 'a', 'd', '--out-dir', str(tmp_path)])


def test_tiny_probe_end_to_end_and_reuse(ptd, tiny, tmp_path, monkeypatch):
    out = tmp_path / 'docs'
    common = ['--tiny', '--probe', '--workers', '0', '--out-dir', str(out), '--data-root',
              str(tiny['root'] / 'data'), '--pretrained-root', str(tiny['root'] / 'pre'),
              '--work-dir', str(tmp_path / 'work'), '--rows', 'a', 'f', 'i']
    saved = ptd.main(common)
    probes = saved['probes']
    assert [p['row'] for p in probes] == ['a', 'f', 'i']
    for p in probes:
        assert p['status'] == 'ok' and math.isfinite(p['mAP']) and p['pretrained_loaded']
        assert p['cpu_s'] > 0
    assert [p['batch'] for p in probes] == [1, 1, 4]
    doc = (out / ptd.DOC).read_text()
    assert ptd.PROBE_BEGIN in doc and "a: BN frozen" in doc
    # --reuse: every run has its result.json, nothing trains again
    monkeypatch.setattr(ptd, 'run_one', lambda job: pytest.fail('ran again'))
    again = ptd.main(common + ['--reuse'])
    assert [p['mAP'] for p in again['probes']] == [p['mAP'] for p in probes]
    # the comparison of the same rows, setting and seeds is the same runs: reused too
    compare = ptd.main([a for a in common if a != '--probe'] + ['--reuse'])
    assert [r['mAP'] for r in compare['results']] == [p['mAP'] for p in probes]
    assert {r['job']['group'] for r in compare['results']} == {'compare'}
    # an interrupted study: one result missing, only that run trains
    ran = []
    monkeypatch.setattr(ptd, 'run_one', lambda job: ran.append(job['row']) or
                        json.loads((Path(job['work_dir']) / 'result.json.bak').read_text()))
    work = sorted((tmp_path / 'work').glob('*/f_b1_s0'))[0]
    (work / 'result.json').rename(work / 'result.json.bak')
    ptd.main(common + ['--reuse'])
    assert ran == ['f']
    # --only-finished: the finished runs of any rows and seeds, nothing trained
    monkeypatch.setattr(ptd, 'run_one', lambda job: pytest.fail('ran'))
    base = [a for a in common[:-4] if a != '--probe']  # the comparison, no --rows
    with pytest.raises(SystemExit, match='add --reuse'):
        ptd.main(base + ['--rows', 'a', '--only-finished'])
    finished = ptd.main(base + ['--rows', 'a', 'f', 'i', 'b', '--seeds', '0', '7',
                                '--reuse', '--only-finished'])
    assert [(r['job']['row'], r['job']['seed']) for r in finished['results']] == [
        ('a', 0), ('f', 0), ('i', 0)]
    with pytest.raises(SystemExit, match='none of these runs'):
        ptd.main(base + ['--rows', 'b', '--reuse', '--only-finished'])


def test_cbn_row_trains_two_iterations(ptd, tiny, tmp_path):
    """The CBN rows run with the installed layer: g (CBN backbone loaded from the BN
    weights, CBN head) for 2 iterations at 1 image, through the tool's own run."""
    setting = dict(tiny['setting'], images=2)
    job = ptd.make_job('g', setting, 0, tiny['data'], tmp_path / 'g', tiny['ckpts'])
    result = ptd.run_one(job)
    assert result['status'] == 'ok', result['status']
    assert result['pretrained_loaded'] is True
    assert result['iters'] == 2 and math.isfinite(result['final_loss'])
    # stem + stages (20) + FPN (8) + box head (4)
    assert result['cbn']['layers'] == 20 + 8 + 4


def test_comparison_json_md_and_plot(ptd, tiny, tmp_path):
    out = tmp_path / 'docs'
    run = ptd.main(['--tiny', '--workers', '0', '--rows', 'b', 'd', '--out-dir', str(out),
                    '--data-root', str(tiny['root'] / 'data'), '--pretrained-root',
                    str(tiny['root'] / 'pre'), '--work-dir', str(tmp_path / 'work'),
                    '--images', '4'])
    assert [r['status'] for r in run['results']] == ['ok', 'ok']
    saved = json.loads((out / ptd.RESULTS_JSON).read_text())
    assert saved['rows'] == ['b', 'd'] and len(saved['results']) == 2
    doc = (out / ptd.DOC).read_text()
    assert ptd.DOC_BEGIN in doc and 'd: BN frozen, CBN head (defaults)' in doc
    assert (out / ptd.PLOT).stat().st_size > 1000
    # --from-json re-renders the same block
    before = doc
    (out / ptd.DOC).write_text('# x\n')
    ptd.main(['--from-json', '--out-dir', str(out)])
    assert (out / ptd.DOC).read_text().split(ptd.DOC_BEGIN)[1] == before.split(ptd.DOC_BEGIN)[1]


@pytest.mark.parametrize('row, name', [
    ('d', 'faster-rcnn_r18-w32_fpn_4conv1fc-cbn_bn-frozen-pretrained_digits.py'),
    ('g', 'faster-rcnn_r18-w32_fpn_4conv1fc-cbn_cbn-pretrained_digits.py')])
def test_committed_configs_are_the_rows_of_the_default_setting(ptd, row, name, tmp_path):
    """configs/pretrained_det/ hold rows d and g as the study trains them by default
    (model, schedule, optimizer, hooks), loading the default recipe's checkpoint."""
    from mmengine.config import Config
    committed = Config.fromfile(str(CONFIGS / name))
    setting = ptd.setting_from_args(ptd.parse_args([]))
    ckpts = {n: str(ptd.pretrain_backbone.checkpoint_path(
        Path('data/pretrained_backbones'), dict(setting['pretrain'], norm=n)))
        for n in ('bn', 'gn')}
    job = ptd.make_job(row, setting, 0, Path('data/small_batch_det/x'), tmp_path, ckpts)
    study = ptd.build_config(job)
    assert committed.model.backbone.init_cfg.checkpoint == ckpts['bn']
    for key in ('model', 'param_scheduler', 'optim_wrapper', 'custom_hooks', 'custom_imports'):
        assert committed[key] == study[key], key
    for key in ('max_iters', 'val_interval'):
        assert committed.train_cfg[key] == study.train_cfg[key], key
    assert committed.train_dataloader.batch_size == study.train_dataloader.batch_size
