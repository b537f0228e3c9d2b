# Shared base of the Mask R-CNN CBN-paper configs (Yao et al., CVPR 2021):
# the authors' COCO setting as deltas on mmdet's own R50-FPN 1x config.
# The per-norm configs beside it only set ``norm_cfg`` of the FPN, box and mask
# heads.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

# Backbone: mmdet's default is already the authors' (ImageNet-pretrained
# ResNet-50 from torchvision, standard BN, statistics frozen, stem and stage 1
# frozen); restated so a change in mmdet's base cannot go unnoticed.
# FPN (4 lateral 1x1 + 4 output 3x3 ConvModules; P6 by max-pooling) and the
# "4conv1fc" box head (4 3x3 256 convs, one 1024 fc) and mmdet's standard mask
# head (4 3x3 256 convs, then the deconv) carry the studied norm;
# ``norm_cfg`` is left unset here (mmdet's default, ``None``) so that a per-norm
# config's dict merges in: mmengine refuses to merge a dict onto a ``None``.
# ``None`` is the no-norm baseline: ConvModule's ``bias='auto'`` then gives
# those convs a bias. The RPN head (one plain nn.Conv2d) never has a norm.
model = dict(
    backbone=dict(
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            fc_out_channels=1024),
        mask_head=dict(type='FCNMaskHead', num_convs=4, conv_out_channels=256)))

# 4 GPUs x 4 images = batch 16; 1333x800 with flip 0.5 is mmdet's pipeline.
train_dataloader = dict(batch_size=4)

# 1x: 12 epochs, lr x0.1 after epochs 8 and 11; linear warm-up over 500
# iterations from lr/3 (mmdet v1 ``warmup_ratio=1.0 / 3``).
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=1.0 / 3, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=35, norm_type=2))

# lr 0.02 is for a total batch of 16: ``tools/train.py --auto-scale-lr`` scales
# it linearly for other GPU counts / batch sizes.
auto_scale_lr = dict(enable=False, base_batch_size=16)
