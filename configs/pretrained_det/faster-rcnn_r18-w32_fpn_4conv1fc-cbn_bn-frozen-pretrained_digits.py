# Row d of the pretrained-backbone study (docs/pretrained_detection.md), the paper's
# placement: the backbone starts from the BN-pretrained digits classifier and keeps
# mmdet's recipe for ImageNet BN weights (statistics and affine frozen, stem and stage 1
# frozen whole); CBN with the plugin's defaults in the FPN and the 4 box-head convs; 1
# image per step. The checkpoint is built (once, cached) by
# ``python tools/analysis_tools/pretrain_backbone.py --norm bn``.
_base_ = '../small_batch_det/faster-rcnn_r18-w32_fpn_4conv1fc-bn-all_digits.py'
pretrained = 'data/pretrained_backbones/resnet18-w32-bn_eba15cb546.pth'
# The README's window rule: about 32 images pooled, 32 steps of 1 image.
cbn = dict(type='CBN', requires_grad=True, window_size=32)
model = dict(
    backbone=dict(norm_cfg=dict(_delete_=True, type='BN', requires_grad=False),
                  norm_eval=True, frozen_stages=1,
                  init_cfg=dict(_delete_=True, type='Pretrained', checkpoint=pretrained)),
    neck=dict(norm_cfg=dict(_delete_=True, **cbn)),
    roi_head=dict(bbox_head=dict(norm_cfg=dict(_delete_=True, **cbn))))

# The study's schedule at 1 image per step: 2,400 images, lr 0.01 (0.01 per image), warm-up
# over 5 % and CBN burn-in (plain BN) over 10 % of the iterations, lr x0.1 at 80 % and 93 %.
max_iters = 2400
train_dataloader = dict(batch_size=1)
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=120),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[1920, 2232], gamma=0.1)]
optim_wrapper = dict(optimizer=dict(lr=0.01))
custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
custom_hooks = [dict(type='CBNHook', burn_in_iters=240)]
