"""The mmengine config of one run: the study's base config, changed where a row differs."""
from __future__ import annotations

from pathlib import Path

from .rows import norm_cfg

REPO = Path(__file__).resolve().parents[3]
# The detector with BN in every norm layer; a job swaps the norm, width, size and schedule.
CONFIG = REPO / 'configs' / 'small_batch_det' / 'faster-rcnn_r18-w32_fpn_4conv1fc-bn-all_digits.py'


def build_config(job: dict):
    """The mmengine Config of one run: the study's base config with the job's norm,
    width, canvas size, batch, schedule and seed."""
    from mmengine.config import Config
    s = job['setting']
    cfg = Config.fromfile(str(CONFIG))
    w = s['width']
    fpn = 2 * w
    norm = norm_cfg(job['norm'])
    m = cfg.model
    m.backbone.base_channels = w
    m.backbone.stem_channels = w
    m.backbone.norm_cfg = (norm_cfg(dict(kind=job['norm']['backbone'])) if 'backbone' in job['norm']
                           else dict(norm))
    m.neck.in_channels = [w, 2 * w, 4 * w, 8 * w]
    m.neck.out_channels = fpn
    m.neck.norm_cfg = dict(norm)
    m.rpn_head.in_channels = m.rpn_head.feat_channels = fpn
    m.roi_head.bbox_roi_extractor.out_channels = fpn
    m.roi_head.bbox_head.in_channels = m.roi_head.bbox_head.conv_out_channels = fpn
    m.roi_head.bbox_head.fc_out_channels = 8 * w
    m.roi_head.bbox_head.norm_cfg = dict(norm)

    root = job['data_root'].rstrip('/') + '/'
    for pipeline in (cfg.train_dataloader.dataset.pipeline, cfg.val_dataloader.dataset.pipeline,
                     cfg.test_dataloader.dataset.pipeline):
        for t in pipeline:
            if t['type'] == 'Resize':
                t['scale'] = (s['size'], s['size'])
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = root
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        evaluator.ann_file = root + 'annotations/val.json'
    cfg.train_dataloader.batch_size = job['batch']

    micro = job['batch']
    iters = s['images'] // micro
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters
    warmup = max(1, round(s['warmup'] * iters))
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=warmup),
        dict(type='MultiStepLR', by_epoch=False, begin=0, end=iters,
             milestones=[int(iters * 0.8), int(iters * 0.93)], gamma=0.1)]
    cfg.optim_wrapper.optimizer.lr = s['lr_per_image'] * job['images_per_step']
    if job['accum'] > 1:
        cfg.optim_wrapper.accumulative_counts = job['accum']
    if job['norm']['kind'] == 'cbn':
        cfg.custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
        burn_in = min(round(s['burn_in'] * iters), iters - job['accum'])
        hooks = [dict(type='CBNHook', burn_in_iters=burn_in)]
        if 'precise_batches' in job['norm']:  # once, after the last step, before validation
            hooks.append(dict(type='PreciseCBNHook', interval=iters,
                              num_batches=job['norm']['precise_batches']))
        cfg.custom_hooks = hooks
        if job['norm']['cbn_args'].get('accumulation') == 'two_pass':
            cfg.train_cfg.type = 'TwoPassIterBasedTrainLoop'  # a statistics pass per step
    cfg.work_dir = job['work_dir']
    cfg.randomness = dict(seed=job['seed'], deterministic=False)
    interval = max(1, iters // 10)
    cfg.default_hooks.logger.interval = interval
    cfg.log_processor.window_size = interval
    cfg.default_hooks.visualization = dict(type='DetVisualizationHook', draw=False)
    return cfg
