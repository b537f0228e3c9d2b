# Cross-Iteration BN with the plugin's defaults in the backbone (deep stem included)
# and both heads: each norm pools the statistics of its GPU's last 4 optimizer steps
# (2 images each, so 8 images, the same count SyncBN gets from 4 GPUs, without
# communication). CBN subclasses BN, so the BN-trained ImageNet weights and running
# statistics load into it unchanged.
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'
norm_cfg = dict(type='CBN', window_size=4, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))

custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
# CBNHook binds every CBN to the conv that feeds it and advances the windows once per
# optimizer step. Burn-in: plain BN for the first 4,000 of the 40,000 iterations (the
# first validation interval), while the poly schedule's learning rate is highest and
# the weights move fastest; our choice, not a published or tuned setting.
custom_hooks = [dict(type='CBNHook', burn_in_iters=4000)]
