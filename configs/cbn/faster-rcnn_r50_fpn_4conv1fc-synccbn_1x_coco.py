# SyncCBN: CBN whose statistics are pooled across GPUs as well as across the last
# 4 optimizer steps (3 buffered), Taylor-compensated (rho=1), the paper's algorithm
# (mode='paper'): per step, the window
# covers 4 steps x all GPUs' images (16 x 4 = 64 in the authors' 4 x 4 setting).
# One all-reduce per layer and forward (statistics and their derivatives), one in
# the backward; the windows are identical on every GPU. Needs distributed training:
# in a single process it is CBN (with a warning). Burn-in: plain SyncBN for the
# first 8 epochs. The authors published no SyncBN+CBN result (not supported there).
_base_ = './_base_faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='SyncCBN', window_size=4, rho=1.0, mode='paper')
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))

# SyncCBN lives in this plugin; its hook binds each layer to its conv, marks the
# optimizer steps and runs the burn-in.
custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
custom_hooks = [dict(type='CBNHook', burn_in_epochs=8)]
