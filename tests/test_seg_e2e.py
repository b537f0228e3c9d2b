"""MMSegmentation end to end through the real tools (CPU, about 45 s).

The configs of ``configs/cbn_seg/`` load and build (FCN R50-D8, the studied
norm in the backbone, deep stem included, and in both heads). Then
``tools/train.py`` trains the real CBN config, shrunk through a derived config
(``_base_`` = ``fcn_r50-d8-cbn_4xb2-40k_cityscapes-512x1024.py``) to a
ResNetV1c-18 of width 16 with an FCN head on a 3-class segmentation set that
``tiny_seg.py`` writes (64 px, 8 train and 4 val images, 2 images a batch),
with ``default_scope='mmseg'`` from the MMSegmentation base. Then:

- ``CBNHook`` binds every norm of the model (25: 3 in the deep stem, 16 in the
  basic blocks, 3 in the downsample branches, 3 in the FCN head) and the
  window switches on after the burn-in;
- MMSegmentation's ``IoUMetric`` gives an mIoU far above what a constant or a
  one-class prediction reaches (the model really learns);
- ``tools/train.py --resume`` from the middle checkpoint continues at that
  iteration with CBN's step counter and windows restored: its losses and
  final mIoU are those of the uninterrupted run, with a ``RandomFlip`` in the
  pipeline: MMEngine's iteration-based loop replays the skipped batches through
  the pipeline, and the RNG state is restored after that replay;
- ``tools/test.py`` evaluates the checkpoint to the same mIoU.
"""
from __future__ import annotations

import re
import textwrap

import pytest
import torch.nn as nn
from mmengine.config import Config
from mmengine.utils.dl_utils.parrots_wrapper import SyncBatchNorm
from torch.nn.modules.batchnorm import _BatchNorm

import cbn_plugin
from helpers import REPO, run_tool
from tiny_coco import scalars
from tiny_seg import write_tiny_seg

CONFIGS = REPO / 'configs' / 'cbn_seg'
STEM = 'fcn_r50-d8-{}_4xb2-40k_cityscapes-512x1024.py'
CBN_CONFIG = CONFIGS / STEM.format('cbn')
NORMS = {
    'bn': (nn.BatchNorm2d, 'BN'),
    'syncbn': (SyncBatchNorm, 'SyncBN'),  # MMEngine's subclass of nn.SyncBatchNorm
    'gn': (nn.GroupNorm, 'GN'),
    'cbn': (cbn_plugin.CrossIterationBatchNorm2d, 'CBN'),
}
ITERS, RESUME_AT, BURN_IN = 40, 20, 4
NUM_NORMS = 3 + 8 * 2 + 3 + 3  # deep stem, BasicBlocks, downsamples, FCN head
MIOU_FLOOR = 60.0  # percent; constant background ~25, one shape class learnt ~55


def mmseg_models():
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return MODELS


@pytest.mark.parametrize('norm', sorted(NORMS))
def test_config_builds_with_its_norm_everywhere(norm):
    cls, kind = NORMS[norm]
    cfg = Config.fromfile(CONFIGS / STEM.format(norm))
    assert cfg.default_scope == 'mmseg'
    assert cfg.train_dataloader.batch_size == 2  # images per GPU: the small-batch case
    assert cfg.train_cfg.max_iters == 40000
    for part in ('backbone', 'decode_head', 'auxiliary_head'):
        assert cfg.model[part].norm_cfg.type == kind, part
    model = mmseg_models().build(cfg.model)
    norms = [m for m in model.modules() if isinstance(m, (_BatchNorm, nn.GroupNorm))]
    # ResNet-50-D8: 3 stem + 16 blocks x 3 + 4 downsample; FCN head 3, auxiliary head 1.
    assert len(norms) == 3 + 48 + 4 + 3 + 1
    assert all(type(m) is cls for m in norms), {type(m).__name__ for m in norms}
    hooks = [h['type'] for h in cfg.get('custom_hooks', [])]
    if norm == 'cbn':
        assert hooks == ['CBNHook'] and cfg.custom_imports.imports == ['cbn_plugin']
        table = cbn_plugin.bind(model, logger=None)
        assert len(table) == len(norms) and all(conv for _, conv in table), table
    else:
        assert 'CBNHook' not in hooks


def tiny_config(data: dict, extra: str = '') -> str:
    """The real CBN config shrunk to ``data`` (what :func:`write_tiny_seg` returned)."""
    size = data['size']
    return textwrap.dedent(f"""\
        _base_ = {str(CBN_CONFIG)!r}
        data_root = {data['root'].rstrip('/') + '/'!r}
        crop_size = ({size}, {size})
        model = dict(
            pretrained=None,
            data_preprocessor=dict(size=crop_size),
            backbone=dict(depth=18, stem_channels=16, base_channels=16),
            decode_head=dict(in_channels=128, channels=32, num_classes=3),
            auxiliary_head=None)
        metainfo = dict(classes={tuple(data['classes'])!r}, palette={data['palette']!r})
        pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                    dict(type='PackSegInputs')]
        dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
                       img_suffix='.png', seg_map_suffix='.png', pipeline=pipeline)
        train_dataloader = dict(
            batch_size=2, num_workers=0, persistent_workers=False,
            dataset=dict(dataset, data_prefix=dict(img_path='img_dir/train',
                                                   seg_map_path='ann_dir/train'),
                         pipeline=pipeline[:2] + [dict(type='RandomFlip', prob=0.5)]
                         + pipeline[2:]))
        val_dataloader = dict(
            batch_size=2, num_workers=0, persistent_workers=False,
            dataset=dict(dataset, data_prefix=dict(img_path='img_dir/val',
                                                   seg_map_path='ann_dir/val')))
        test_dataloader = val_dataloader
        optim_wrapper = dict(optimizer=dict(lr=0.1))
        param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end={ITERS},
                                by_epoch=False)]
        train_cfg = dict(max_iters={ITERS}, val_interval={ITERS})
        default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={RESUME_AT}))
        custom_hooks = [dict(type='CBNHook', burn_in_iters={BURN_IN})]
        randomness = dict(seed=0)
    """) + textwrap.dedent(extra)


def miou(log: str) -> float:
    """The last mIoU (percent) MMSegmentation's IoUMetric printed in ``log``."""
    found = re.findall(r'Iter\((?:val|test)\) \[\d+/\d+\]\s+aAcc: [\d.]+\s+mIoU: ([\d.]+)', log)
    assert found, f'no mIoU in the log:\n{log[-3000:]}'
    return float(found[-1])


def class_ious(log: str) -> dict[str, float]:
    """The last per-class IoU table IoUMetric printed."""
    table = log[log.rindex('per class results'):]
    return {name: float(iou) for name, iou in
            re.findall(r'^\|\s+(background|rectangle|ellipse)\s+\|\s+([\d.]+)\s+\|', table, re.M)}


@pytest.fixture(scope='module')
def seg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('seg')
    data = write_tiny_seg(tmp / 'data', num_train=8, num_val=4, size=64, seed=0)
    config = tmp / 'tiny_fcn-r18_cbn.py'
    config.write_text(tiny_config(data))
    work_dir = tmp / 'work'
    log = run_tool('tools/train.py', config, '--work-dir', work_dir)
    return dict(data=data, config=config, work_dir=work_dir, log=log, tmp=tmp)


def test_hook_binds_every_norm_and_switches_the_window_on(seg):
    assert f'cbn_plugin: bound {NUM_NORMS} CBN layers' in seg['log']
    # The same count as the norms the tiny model has, all of them CBN.
    cfg = Config.fromfile(seg['config'])
    model = mmseg_models().build(cfg.model)
    norms = [m for m in model.modules() if isinstance(m, (_BatchNorm, nn.GroupNorm))]
    assert len(norms) == NUM_NORMS
    assert all(isinstance(m, cbn_plugin.CBN) for m in norms)
    table = cbn_plugin.bind(model, logger=None)
    assert len(table) == NUM_NORMS and all(conv for _, conv in table), table
    assert [(n, c) for n, c in table if n.startswith('backbone.stem')] == [
        ('backbone.stem.1', 'backbone.stem.0'), ('backbone.stem.4', 'backbone.stem.3'),
        ('backbone.stem.7', 'backbone.stem.6')]
    records = scalars(seg['work_dir'])
    assert [r['iter'] for r in records] == list(range(1, ITERS + 1))
    windows = [r['cbn_window'] for r in records]
    assert windows[:BURN_IN] == [1.0] * BURN_IN and set(windows[BURN_IN:]) == {4.0}, windows


def test_learns_segmentation(seg):
    value = miou(seg['log'])
    assert MIOU_FLOOR <= value <= 100, value
    ious = class_ious(seg['log'])
    assert set(ious) == {'background', 'rectangle', 'ellipse'}
    assert min(ious.values()) > 40, ious  # every class is found, not only the majority
    losses = [r['loss'] for r in scalars(seg['work_dir'])]
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_continues_exactly(seg):
    work_dir = seg['tmp'] / 'resumed'
    log = run_tool('tools/train.py', seg['config'], '--work-dir', work_dir,
                   '--resume', seg['work_dir'] / f'iter_{RESUME_AT}.pth')
    assert f'resumed epoch: 0, iter: {RESUME_AT}' in log
    assert f'resumed at step {RESUME_AT}' in log  # CBN's step counter came back
    resumed = scalars(work_dir)
    assert [r['iter'] for r in resumed] == list(range(RESUME_AT + 1, ITERS + 1))
    assert all(r['cbn_window'] == 4.0 for r in resumed)  # no second burn-in
    original = {r['iter']: r['loss'] for r in scalars(seg['work_dir'])}
    assert [r['loss'] for r in resumed] == [original[r['iter']] for r in resumed]
    assert miou(log) == miou(seg['log'])


def test_test_tool_gives_the_same_miou(seg):
    work_dir = seg['tmp'] / 'test'
    log = run_tool('tools/test.py', seg['config'], seg['work_dir'] / f'iter_{ITERS}.pth',
                   '--work-dir', work_dir)
    assert 'Iter(test)' in log
    assert miou(log) == miou(seg['log'])
