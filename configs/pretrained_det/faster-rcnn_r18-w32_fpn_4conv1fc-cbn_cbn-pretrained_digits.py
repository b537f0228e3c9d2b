# Row g of the pretrained-backbone study (docs/pretrained_detection.md), the edge GN lacks:
# CBN is a _BatchNorm, so the backbone's CBN layers load the BN-pretrained digits
# classifier strictly and train at 1 image per step (stem and stage 1 frozen whole, as
# in every row); CBN with the plugin's defaults in the FPN and the 4 box-head convs too.
# The checkpoint is built (once, cached) by
# ``python tools/analysis_tools/pretrain_backbone.py --norm bn``.
_base_ = './faster-rcnn_r18-w32_fpn_4conv1fc-cbn_bn-frozen-pretrained_digits.py'
cbn = dict(type='CBN', requires_grad=True, window_size=32)
model = dict(backbone=dict(norm_cfg=dict(_delete_=True, **cbn), norm_eval=False))
