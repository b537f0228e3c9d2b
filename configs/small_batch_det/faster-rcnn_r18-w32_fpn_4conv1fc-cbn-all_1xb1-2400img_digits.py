# The demo (make demo, docs/demo.md): CBN with the plugin's defaults in every norm layer
# of the digits Faster R-CNN, trained from scratch at 1 image per optimizer step: the
# comparison's 'CBN (new defaults)' row, seed 0 (docs/small_batch_detection.md).
# tests/test_demo.py checks that the study builds exactly this config for that row.
_base_ = './faster-rcnn_r18-w32_fpn_4conv1fc-bn-all_1xb1-2400img_digits.py'

demo = dict(row='cbn', label='CBN (new defaults)')

custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
# No window_size: CBNHook derives it from the images per optimizer step, k = 32 steps of
# 1 image here (cbn_plugin.derived_window_size; the README's rule).
norm_cfg = dict(type='CBN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
# Plain BN for the first 10 % of the steps, then the full window.
custom_hooks = [dict(type='CBNHook', burn_in_iters=240)]
