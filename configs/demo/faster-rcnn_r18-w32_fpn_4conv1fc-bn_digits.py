# BN (statistics of the current 2 images) in the FPN and the box-head convs.
_base_ = './_base_faster-rcnn_r18-w32_fpn_digits.py'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
