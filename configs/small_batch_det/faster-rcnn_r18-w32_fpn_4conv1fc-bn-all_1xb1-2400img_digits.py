# One run of the small-batch detection comparison (docs/small_batch_detection.md), as a
# config of its own: BN in every norm layer at 1 image per optimizer step, the row that
# fails ('BN'), seed 0, in the comparison's setting. The demo trains it with
#   .venv/bin/python tools/demo.py --config THIS_FILE
# and tools/train.py can too (after tools/make_digits_det.py has written the data under
# data_root). tests/test_demo.py checks that the study builds exactly this config for
# that row.
_base_ = './faster-rcnn_r18-w32_fpn_4conv1fc-bn-all_digits.py'

# Which run of the comparison this is: tools/demo.py writes the data of ``setting``
# (tools/make_digits_det.py), points the loaders at it, and prints this run beside the
# committed rows when the committed comparison ran the same setting.
demo = dict(
    row='bn',
    label='BN',
    setting=dict(size=128, num_train=1600, num_val=300, digits=[3, 6], digit_px=[16, 40],
                 clutter=[3, 8], width=32, images=2400, lr_per_image=0.01, warmup=0.05,
                 burn_in=0.1, data_seed=0, large=4, small=1))

# 2,400 images seen at 1 image per step: 2,400 iterations, validated once at the end.
# lr 0.01 per image per step (linear scaling), warm-up 5 % of the iterations, x0.1 at
# 80 % and 93 %.
train_dataloader = dict(batch_size=1)
train_cfg = dict(max_iters=2400, val_interval=2400)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=120),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=2400, milestones=[1920, 2232],
         gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr=0.01))
randomness = dict(seed=0, deterministic=False)
# The loss logged every 10 % of training; no images drawn at validation.
default_hooks = dict(logger=dict(interval=240), visualization=dict(draw=False))
log_processor = dict(window_size=240)
