# Naive CBN: CBN's window of 4 steps without compensation (rho=0), the
# paper's ablation (mode='paper', as the paper's CBN config); same burn-in as CBN.
_base_ = './_base_faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='CBN', window_size=4, rho=0.0, mode='paper')
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))

# CBN lives in this plugin; its hook binds each CBN to its conv, marks the
# optimizer steps and runs the burn-in.
custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
custom_hooks = [dict(type='CBNHook', burn_in_epochs=8)]
