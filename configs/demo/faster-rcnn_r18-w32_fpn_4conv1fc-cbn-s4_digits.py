# CBN with sampled derivatives: dvar/dW estimated from one output position in
# dvar_stride^2 = 16 (every 4th row and column of the FPN maps, every 16th RoI in
# the box head); the statistics themselves stay exact.
_base_ = './faster-rcnn_r18-w32_fpn_4conv1fc-cbn_digits.py'
norm_cfg = dict(type='CBN', window_size=4, rho=1.0, dvar_stride=4)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
