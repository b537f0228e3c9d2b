# No norm in the FPN and heads (conv bias): the authors' baseline.
_base_ = './_base_faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = None
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
