# Per-GPU BatchNorm (4 images per GPU). Not in the authors' table.
_base_ = './_base_faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
