# The demo's config in the study's tiny setting (tools/demo.py --tiny): the whole
# pipeline in seconds, on 8 train canvases of 64 px and a detector of width 8 trained
# for 8 images. It measures nothing; tests/test_demo.py runs it against the study's own
# tiny run of the same row.
_base_ = './faster-rcnn_r18-w32_fpn_4conv1fc-cbn-all_1xb1-2400img_digits.py'

demo = dict(setting=dict(size=64, num_train=8, num_val=4, digit_px=[8, 20], width=8, images=8))

# Width 8: backbone 8-16-32-64 channels, FPN and box head 16, fc 64.
model = dict(
    backbone=dict(base_channels=8, stem_channels=8),
    neck=dict(in_channels=[8, 16, 32, 64], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=16),
        bbox_head=dict(in_channels=16, conv_out_channels=16, fc_out_channels=64)))

# 64-px canvases (the pipelines are lists: restated whole).
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs'),
]))
val_dataloader = dict(dataset=dict(pipeline=[
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]))
test_dataloader = val_dataloader

# 8 images at 1 per step: 8 iterations; warm-up 1, x0.1 at 6 and 7; burn-in 1 step.
train_cfg = dict(max_iters=8, val_interval=8)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=8, milestones=[6, 7], gamma=0.1),
]
custom_hooks = [dict(type='CBNHook', burn_in_iters=1)]
default_hooks = dict(logger=dict(interval=1))
log_processor = dict(window_size=1)
