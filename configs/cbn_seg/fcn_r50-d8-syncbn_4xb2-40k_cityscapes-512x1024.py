# The reference run: MMSegmentation's own FCN R50-D8 on Cityscapes, 40k iterations,
# 4 GPUs x 2 images, SyncBN in the backbone and both heads (statistics over the
# 8 images of a step). Unchanged; here to compare against the per-GPU norms beside it.
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))
