# Cross-Iteration BN in the FPN and the box-head convs: statistics pooled over
# the last 4 optimizer steps (3 buffered), Taylor-compensated (rho=1), after a
# burn-in of plain BN.
_base_ = './_base_faster-rcnn_r18-w32_fpn_digits.py'
norm_cfg = dict(type='CBN', window_size=4, rho=1.0)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))

custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
custom_hooks = [dict(type='CBNHook', burn_in_iters=800)]
