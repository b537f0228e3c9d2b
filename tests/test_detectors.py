"""CBN inside real mmdet detectors: a head shared over FPN levels, and a CBN backbone."""
import torch
from mmengine.hub import get_config
from mmengine.runner import load_checkpoint
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmdet.utils import register_all_modules

import cbn_plugin
from cbn_plugin import CBN

register_all_modules()
SMALL_BACKBONE = dict(depth=18, init_cfg=None, frozen_stages=-1, norm_eval=False)
SMALL_NECK = dict(in_channels=[64, 128, 256, 512], out_channels=32)


def train_steps(model, steps, image=96, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps):
        batch = demo_mm_inputs(2, (3, image, image), num_items=[2, 3], num_classes=3)
        data = model.data_preprocessor(batch, True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        opt.zero_grad()
        loss.backward()
        opt.step()
        cbn_plugin.step(model)
        losses.append(loss.item())
    return losses


def test_retinanet_head_shared_over_levels_keeps_one_window_per_level():
    cfg = get_config('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py').model
    cfg.backbone.update(SMALL_BACKBONE)
    cfg.neck.update(SMALL_NECK)
    cfg.bbox_head.update(in_channels=32, feat_channels=32, stacked_convs=2, num_classes=3,
                         norm_cfg=dict(type='CBN', window_size=3, per_call_windows=True))
    model = MODELS.build(cfg)
    pairs = dict(cbn_plugin.bind(model, logger=None))
    head_norms = [n for n in pairs if n.startswith('bbox_head.')]
    assert len(head_norms) == 4 and all(pairs[n].endswith('.conv') for n in head_norms)
    losses = train_steps(model, 4)
    assert all(torch.isfinite(torch.tensor(losses)))
    for name in head_norms:
        layer = dict(model.named_modules())[name]
        # Five FPN levels, each its own window, each advanced once per step.
        assert layer.window_mean.shape[:2] == (5, 2)
        assert layer.window_filled.tolist() == [2] * 5 and layer.steps_done == 4
        level_means = layer.window_mean[:, 0].abs().mean(1)
        assert len(set(level_means.tolist())) == 5
        assert layer.diagnostics['window'] == 3


def faster_rcnn_cfg(backbone_norm):
    cfg = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py').model
    cfg.backbone.update(SMALL_BACKBONE, norm_cfg=backbone_norm)
    cfg.neck.update(SMALL_NECK)
    cfg.rpn_head.update(in_channels=32, feat_channels=32)
    cfg.roi_head.bbox_roi_extractor.update(out_channels=32)
    cfg.roi_head.bbox_head.update(in_channels=32, fc_out_channels=64, num_classes=3)
    cfg.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
    cfg.train_cfg.rcnn.sampler.update(num=32)
    return cfg


def test_cbn_backbone_loads_bn_checkpoint_honours_norm_eval_and_trains(tmp_path):
    bn_model = MODELS.build(faster_rcnn_cfg(dict(type='BN', requires_grad=True)))
    with torch.no_grad():
        for m in bn_model.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / 'bn_backbone.pth'
    torch.save({'state_dict': bn_model.state_dict()}, path)

    cfg = faster_rcnn_cfg(dict(type='CBN', window_size=2, requires_grad=True))
    cfg.backbone.norm_eval = True
    model = MODELS.build(cfg)
    load_checkpoint(model, str(path), strict=True)
    expect = bn_model.backbone.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, expect[key]), key
    cbn_plugin.bind(model, logger=None)
    model.train()
    backbone_cbns = [m for m in model.backbone.modules() if isinstance(m, CBN)]
    assert len(backbone_cbns) == 20 and not any(m.training for m in backbone_cbns)
    train_steps(model, 1)
    assert all(m.window_mean is None for m in backbone_cbns)

    model.backbone.norm_eval = False
    model.train()
    losses = train_steps(model, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(m.diagnostics['window'] == 2 for m in backbone_cbns)
