"""The paper-reproduction configs in ``configs/cbn/``: load, build, walk.

Every config in the folder (today 6 norms x 2 detectors as in the paper, SyncCBN
for Faster R-CNN, and CBN with the plugin's defaults for both detectors; the
detector and the norm are read from the file name) is loaded with
``Config.fromfile`` and its model built (never initialised: no
pretrained weights can be downloaded), then the built model is walked to
check that the norm under study sits exactly where the authors put it (8 FPN
ConvModules, 4 box-head convs, 4 mask-head convs), and nowhere else outside
the backbone, and that the training settings are the authors' COCO ones
(the "Setting" table of ``configs/cbn/README.md``).
"""
from __future__ import annotations

import functools
import os.path as osp
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import mmdet
import pytest
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.config import Config
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

import cbn_plugin
from mmdet.registry import HOOKS, MODELS
from mmdet.utils import register_all_modules

register_all_modules()

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs' / 'cbn'
MMDET_CONFIGS = Path(osp.dirname(mmdet.__file__)) / '.mim' / 'configs'
MMDET_BASE = {
    'faster-rcnn': MMDET_CONFIGS / 'faster_rcnn' / 'faster-rcnn_r50_fpn_1x_coco.py',
    'mask-rcnn': MMDET_CONFIGS / 'mask_rcnn' / 'mask-rcnn_r50_fpn_1x_coco.py',
}
DETECTOR_TYPE = {'faster-rcnn': 'FasterRCNN', 'mask-rcnn': 'MaskRCNN'}

# norm key in the file name -> (exact class of the built layer, its norm_cfg)
NORMS = {
    'none': (None, None),
    'bn': (nn.BatchNorm2d, dict(type='BN', requires_grad=True)),
    'syncbn': (nn.SyncBatchNorm, dict(type='SyncBN', requires_grad=True)),
    'gn': (nn.GroupNorm, dict(type='GN', num_groups=32, requires_grad=True)),
    'naive-cbn': (cbn_plugin.CrossIterationBatchNorm2d,
                  dict(type='CBN', window_size=4, rho=0.0, mode='paper')),
    'cbn': (cbn_plugin.CrossIterationBatchNorm2d,
            dict(type='CBN', window_size=4, rho=1.0, mode='paper')),
    'synccbn': (cbn_plugin.SyncCrossIterationBatchNorm2d,
                dict(type='SyncCBN', window_size=4, rho=1.0, mode='paper')),
    'cbn-default': (cbn_plugin.CrossIterationBatchNorm2d, dict(type='CBN', window_size=4)),
}
CBN_NORMS = ('naive-cbn', 'cbn', 'synccbn', 'cbn-default')
# What each CBN config's layers must do: the paper's algorithm or the plugin's defaults.
CBN_MODES = {'naive-cbn': 'paper', 'cbn': 'paper', 'synccbn': 'paper', 'cbn-default': 'default'}
# SyncCBN (no published result: the authors' code did not support it) for Faster R-CNN only.
ONLY_FOR = {'synccbn': ('faster-rcnn',)}


def config_name(detector: str, norm: str) -> str:
    suffix = '' if norm == 'none' else f'-{norm}'
    return f'{detector}_r50_fpn_4conv1fc{suffix}_1x_coco'


NAME = re.compile(r'(?P<det>[a-z-]+?)_r50_fpn_4conv1fc(?:-(?P<norm>[a-z-]+))?_1x_coco')


def discovered() -> list[tuple[str, str]]:
    """(detector, norm) of every config in the folder, read from its file name."""
    cases = []
    for path in sorted(CONFIG_DIR.glob('*.py')):
        if path.name.startswith('_base_'):
            continue
        match = NAME.fullmatch(path.stem)
        cases.append((match['det'], match['norm'] or 'none') if match else (path.stem, None))
    return cases


CASES = discovered()
CONFIGS = [config_name(det, norm) if norm else det for det, norm in CASES]

# Where the studied norm must be, and the only ConvModules outside the backbone.
FPN_CONVS = [f'neck.lateral_convs.{i}' for i in range(4)] + \
            [f'neck.fpn_convs.{i}' for i in range(4)]
BOX_CONVS = [f'roi_head.bbox_head.shared_convs.{i}' for i in range(4)]
MASK_CONVS = [f'roi_head.mask_head.convs.{i}' for i in range(4)]
# ResNet-50: stem bn1 + 16 bottlenecks x 3 + 4 downsample BNs.
R50_NUM_BNS = 1 + 16 * 3 + 4


def expected_convmodules(detector: str) -> set[str]:
    names = FPN_CONVS + BOX_CONVS + (MASK_CONVS if detector == 'mask-rcnn' else [])
    return set(names)


def has_type(module: nn.Module, cls: type) -> bool:
    """Exact class, except SyncBN: mmengine registers a thin subclass of torch's."""
    if cls is nn.SyncBatchNorm:
        return isinstance(module, nn.SyncBatchNorm)
    return type(module) is cls


def unscoped(value):
    """``value`` without the ``_scope_`` keys that ``mmdet::`` bases gain when inherited."""
    if isinstance(value, dict):
        return {k: unscoped(v) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return type(value)(unscoped(v) for v in value)
    return value


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm))


@functools.lru_cache(maxsize=None)
def mmdet_base(detector: str) -> Config:
    return Config.fromfile(str(MMDET_BASE[detector]))


@pytest.fixture(scope='module', params=CASES, ids=CONFIGS)
def built(request):
    """Load and build each config once; module scope groups its tests together."""
    detector, norm = request.param
    name = CONFIGS[CASES.index(request.param)]
    cfg = Config.fromfile(str(CONFIG_DIR / f'{name}.py'))
    model = MODELS.build(cfg.model)
    modules = dict(model.named_modules())
    return SimpleNamespace(name=name, detector=detector, norm=norm, cfg=cfg, model=model,
                           modules=modules)


def test_every_config_names_what_it_builds():
    """Each file name says the detector and the norm; the checks below hold it to them."""
    unknown = [name for (det, norm), name in zip(CASES, CONFIGS)
               if det not in DETECTOR_TYPE or norm not in NORMS
               or det not in ONLY_FOR.get(norm, DETECTOR_TYPE)]
    assert not unknown, f'configs whose name is no known detector/norm pair: {unknown}'
    # The paper's grid is complete: every norm for both detectors (SyncCBN: Faster R-CNN).
    assert set(CASES) >= {(det, norm) for det in DETECTOR_TYPE for norm in NORMS
                          if det in ONLY_FOR.get(norm, DETECTOR_TYPE)}


# --------------------------------------------------------------------- model


def test_detector_type(built):
    assert type(built.model).__name__ == DETECTOR_TYPE[built.detector]
    assert built.cfg.model.type == DETECTOR_TYPE[built.detector]


def test_convmodules_outside_backbone(built):
    """Exactly 8 FPN + 4 box (+ 4 mask) ConvModules; none in the RPN head."""
    found = {name for name, m in built.modules.items()
             if isinstance(m, ConvModule) and not name.startswith('backbone.')}
    assert found == expected_convmodules(built.detector)
    for name in FPN_CONVS[:4]:
        assert built.modules[name].conv.kernel_size == (1, 1), name
    for name in found - set(FPN_CONVS[:4]):
        assert built.modules[name].conv.kernel_size == (3, 3), name
    for name in found:
        assert built.modules[name].conv.out_channels == 256, name


def test_norm_placement(built):
    """The studied norm is in exactly those ConvModules and nowhere else but the backbone."""
    expected_type, _ = NORMS[built.norm]
    norms = {name: m for name, m in built.modules.items()
             if is_norm(m) and not name.startswith('backbone.')}
    owners = [name.rsplit('.', 1)[0] for name in norms]
    if expected_type is None:
        assert norms == {}
    else:
        assert len(norms) == len(expected_convmodules(built.detector))
        assert set(owners) == expected_convmodules(built.detector)
        for name, m in norms.items():
            assert has_type(m, expected_type), (name, type(m))
            channels = m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features
            assert channels == 256, name
    assert not any(name.startswith('rpn_head.') for name in norms)


def test_conv_bias_and_norm_per_convmodule(built):
    """No norm: every FPN/head conv has a bias; with a norm: no conv bias, one norm."""
    expected_type, norm_cfg = NORMS[built.norm]
    for name in expected_convmodules(built.detector):
        cm = built.modules[name]
        if expected_type is None:
            assert not cm.with_norm and cm.norm_cfg is None, name
            assert cm.conv.bias is not None, name
        else:
            assert cm.with_norm, name
            assert cm.conv.bias is None, name
            assert has_type(cm.norm, expected_type), name
            assert dict(cm.norm_cfg) == norm_cfg, name


def test_rpn_head_has_no_norm(built):
    rpn = built.model.rpn_head
    assert type(rpn.rpn_conv) is nn.Conv2d
    assert rpn.rpn_conv.bias is not None
    assert not any(is_norm(m) or isinstance(m, ConvModule) for m in rpn.modules())


def test_box_head_is_4conv1fc(built):
    head = built.model.roi_head.bbox_head
    assert type(head).__name__ == 'Shared4Conv1FCBBoxHead'
    assert len(head.shared_convs) == 4
    assert len(head.shared_fcs) == 1
    assert head.shared_fcs[0].in_features == 256 * 7 * 7
    assert head.shared_fcs[0].out_features == 1024
    for branch in (head.cls_convs, head.cls_fcs, head.reg_convs, head.reg_fcs):
        assert len(branch) == 0


def test_mask_head(built):
    if built.detector != 'mask-rcnn':
        assert not built.model.roi_head.with_mask
        return
    head = built.model.roi_head.mask_head
    assert type(head).__name__ == 'FCNMaskHead'
    assert len(head.convs) == 4


def test_backbone_frozen_standard_bn(built):
    backbone = built.model.backbone
    assert type(backbone).__name__ == 'ResNet' and backbone.depth == 50
    assert backbone.norm_eval is True
    assert backbone.frozen_stages == 1
    assert built.cfg.model.backbone.init_cfg == dict(
        type='Pretrained', checkpoint='torchvision://resnet50')
    bns = [m for m in backbone.modules() if is_norm(m)]
    assert len(bns) == R50_NUM_BNS
    assert all(type(m) is nn.BatchNorm2d for m in bns)
    # Stem and stage 1 frozen, stage 2 trainable.
    for part in (backbone.conv1, backbone.norm1, backbone.layer1):
        assert not any(p.requires_grad for p in part.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    # norm_eval: backbone BNs stay in eval mode under train(); the studied norms train.
    built.model.train()
    try:
        assert not any(m.training for m in bns)
        studied = [m for name, m in built.modules.items()
                   if is_norm(m) and not name.startswith('backbone.')]
        assert all(m.training for m in studied)
    finally:
        built.model.eval()


def test_cbn_layers_window_and_rho(built):
    cbns = [m for m in built.model.modules()
            if isinstance(m, cbn_plugin.CrossIterationBatchNorm2d)]
    if built.norm not in CBN_NORMS:
        assert cbns == []
        return
    assert len(cbns) == len(expected_convmodules(built.detector))
    rho = NORMS[built.norm][1].get('rho', 1.0)
    preset = cbn_plugin.layer.MODES[CBN_MODES[built.norm]]
    for m in cbns:
        assert m.window_size == 4
        assert m.rho == rho
        assert (m.stats_backward, m.running_stats, m.compensation) == (
            preset['stats_backward'], preset['running_stats'], preset['compensation'])


def test_gn_groups(built):
    gns = [m for m in built.model.modules() if isinstance(m, nn.GroupNorm)]
    if built.norm != 'gn':
        assert gns == []
        return
    assert len(gns) == len(expected_convmodules(built.detector))
    assert all(m.num_groups == 32 and m.num_channels == 256 for m in gns)


# -------------------------------------------------------------------- config


def test_optimizer(built):
    ow = built.cfg.optim_wrapper
    assert ow.type == 'OptimWrapper'
    assert ow.optimizer == dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001)
    assert ow.clip_grad == dict(max_norm=35, norm_type=2)


def test_schedule(built):
    cfg = built.cfg
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop'
    assert cfg.train_cfg.max_epochs == 12
    assert len(cfg.param_scheduler) == 2
    warmup, steps = cfg.param_scheduler
    assert warmup.type == 'LinearLR'
    assert warmup.start_factor == pytest.approx(1 / 3)
    assert (warmup.by_epoch, warmup.begin, warmup.end) == (False, 0, 500)
    assert steps.type == 'MultiStepLR'
    assert steps.by_epoch is True
    assert list(steps.milestones) == [8, 11]
    assert steps.gamma == 0.1
    assert (steps.begin, steps.end) == (0, 12)


def test_batch_and_auto_scale_lr(built):
    assert built.cfg.train_dataloader.batch_size == 4
    assert built.cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)


def test_pipeline_1333x800_flip(built):
    pipeline = built.cfg.train_dataloader.dataset.pipeline
    resize = [t for t in pipeline if t.type == 'Resize']
    flip = [t for t in pipeline if t.type == 'RandomFlip']
    assert len(resize) == 1 and tuple(resize[0].scale) == (1333, 800) and resize[0].keep_ratio
    assert len(flip) == 1 and flip[0].prob == 0.5
    ann = [t for t in pipeline if t.type == 'LoadAnnotations']
    assert len(ann) == 1 and ann[0].get('with_mask', False) == (built.detector == 'mask-rcnn')
    assert built.cfg.train_dataloader.dataset.data_root == 'data/coco/'


def test_rest_is_mmdet_default(built):
    """Only the deltas differ from mmdet's own R50-FPN 1x config."""
    cfg, base = built.cfg, mmdet_base(built.detector)
    for key in ('default_scope', 'default_hooks', 'env_cfg', 'val_cfg', 'test_cfg',
                'val_dataloader', 'test_dataloader', 'val_evaluator', 'test_evaluator',
                'load_from', 'resume'):
        assert unscoped(cfg[key]) == unscoped(base[key]), key
    for key in ('data_preprocessor', 'rpn_head', 'train_cfg', 'test_cfg'):
        assert unscoped(cfg.model[key]) == unscoped(base.model[key]), key
    assert unscoped(cfg.train_dataloader.dataset) == unscoped(base.train_dataloader.dataset)
    assert cfg.train_cfg.val_interval == base.train_cfg.val_interval


def test_custom_imports_and_hooks(built):
    cfg = built.cfg
    if built.norm in CBN_NORMS:
        assert cfg.custom_imports == dict(imports=['cbn_plugin'], allow_failed_imports=False)
        assert cfg.custom_hooks == [dict(type='CBNHook', burn_in_epochs=8)]
    else:
        assert 'custom_imports' not in cfg
        assert 'custom_hooks' not in cfg


@pytest.mark.parametrize('detector,norm', [(d, n) for d, n in CASES
                                           if n in ('cbn', 'synccbn', 'cbn-default')])
def test_cbn_hook_config_builds(detector, norm):
    """The CBN and SyncCBN configs' hook entry builds from the hooks registry."""
    cfg = Config.fromfile(str(CONFIG_DIR / f'{config_name(detector, norm)}.py'))
    for hook_cfg in cfg.custom_hooks:
        hook = HOOKS.build(hook_cfg.copy())
        assert type(hook).__name__ == 'CBNHook'


@pytest.mark.parametrize('sync_bn, refused', [('torch', True), (None, False)])
def test_a_sync_bn_config_of_cbn_layers_is_refused_by_train(tmp_path, tiny_coco_set, sync_bn,
                                                          refused):
    """mmengine's ``sync_bn`` would replace every BatchNorm subclass, CBN included, by plain
    SyncBatchNorm: ``tools/train.py`` on the CBN config with ``sync_bn`` stops before the
    first step and says what to use instead; the same config without it trains."""
    from helpers import FASTER, REPO
    from tiny_coco import narrow_config
    config = tmp_path / 'faster_cbn.py'
    extra = f'sync_bn = {sync_bn!r}\n' if sync_bn else ''
    config.write_text(narrow_config(FASTER, tiny_coco_set(4), extra=extra + textwrap.dedent("""\
        train_cfg = dict(max_epochs=1, val_interval=10)
        custom_hooks = [dict(type='CBNHook', burn_in_iters=0)]
        """)))
    out = subprocess.run([sys.executable, 'tools/train.py', str(config), '--work-dir',
                          str(tmp_path / 'work')], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    log = out.stdout + out.stderr
    if refused:
        assert out.returncode != 0, log[-3000:]
        assert "sync_bn='torch'" in log and "['CBN'] layers into plain SyncBN" in log, log[-3000:]
        assert "norm_cfg=dict(type='SyncCBN')" in log
    else:
        assert out.returncode == 0, log[-3000:]
        assert 'CBNHook: burn-in 0 of' in log
