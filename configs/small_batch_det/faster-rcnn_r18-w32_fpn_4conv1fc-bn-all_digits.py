# The small-batch detection study (tools/analysis_tools/small_batch_detection.py,
# docs/small_batch_detection.md): the demo's Faster R-CNN with the studied norm in
# EVERY norm layer, trained from scratch: the ResNet stem and stages (the
# downsample shortcuts included), the FPN and the box-head convs (the RPN head
# has none). BN here; the study swaps ``norm_cfg`` of the three places per row
# (GN, CBN variants) and sets the batch, schedule, image size and width itself.
_base_ = '../demo/_base_faster-rcnn_r18-w32_fpn_digits.py'
norm_cfg = dict(type='BN', requires_grad=True)
# _delete_: the base's backbone norm is GN (num_groups=8), which must not merge in.
model = dict(
    backbone=dict(norm_cfg=dict(_delete_=True, **norm_cfg)),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
