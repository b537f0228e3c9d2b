# Cross-Iteration BN as in the paper (mode='paper': gradient through this batch's
# statistics only, inference statistics from the batches, the (mu, nu) Taylor step):
# statistics pooled over the last 4 optimizer steps (3 buffered), Taylor-compensated
# (rho=1); burn-in: plain BN for the first 8 epochs. The plugin's defaults are in
# ./faster-rcnn_r50_fpn_4conv1fc-cbn-default_1x_coco.py.
_base_ = './_base_faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='CBN', window_size=4, rho=1.0, mode='paper')
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))

# CBN lives in this plugin; its hook binds each CBN to its conv, marks the
# optimizer steps and runs the burn-in.
custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
custom_hooks = [dict(type='CBNHook', burn_in_epochs=8)]
