# Cross-Iteration BN with this plugin's defaults (docs/small_batch.md): the exact
# gradient of the forward (the compensated past entries pass gradient to the conv
# weight), inference statistics from the pooled window, the Taylor step on the
# variance. Otherwise as ./mask-rcnn_r50_fpn_4conv1fc-cbn_1x_coco.py (the paper's
# mode): window of 4 optimizer steps, rho=1, burn-in of plain BN for 8 epochs.
_base_ = './_base_mask-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='CBN', window_size=4)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))

custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
custom_hooks = [dict(type='CBNHook', burn_in_epochs=8)]
