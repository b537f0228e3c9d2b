"""Small-batch detection study: BN, GN and CBN in every norm layer of a Faster R-CNN.

The demo's digits detector (``configs/demo/_base_faster-rcnn_r18-w32_fpn_digits.py``,
data from ``tools/make_digits_det.py``) trained from scratch with the studied norm in
*every* norm layer: the ResNet stem and stages (downsample shortcuts included), the FPN
and the box-head convs (``configs/small_batch_det/``). Every run sees the same number of
training images; the learning rate is scaled linearly with the images per optimizer step
(Goyal et al.), and warm-up, learning-rate steps and CBN burn-in are fixed fractions of
the images seen. CBN's window spans the large reference batch: ``k = large / batch``
optimizer steps.

Three modes, one json each, rendered into ``docs/small_batch_detection.md``:

    # BN-only probes (finding the setting): BN at the large batch and the small ones
    .venv/bin/python tools/analysis_tools/small_batch_detection.py --probe \\
        --batches 8 2 1 --size 128 --width 32 --images 4000
    # the comparison in the chosen setting (rows x seeds, --workers processes)
    .venv/bin/python tools/analysis_tools/small_batch_detection.py
    # a few seconds: the whole pipeline on a tiny data set, into --out-dir
    .venv/bin/python tools/analysis_tools/small_batch_detection.py --tiny --out-dir /tmp/sbd
    # re-render the md and the plot from the json, no training
    .venv/bin/python tools/analysis_tools/small_batch_detection.py --from-json

Probes are appended to ``docs/small_batch_detection_probes.json`` (a rerun of the same
setting, batch and seed replaces its entry); the comparison writes
``docs/small_batch_detection.json`` and ``docs/small_batch_detection.png``. Each run is a
child process with one torch thread (``--workers 0``: in this process, one after the
other); its wall time (process start to val metrics) is recorded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tools'))

import make_digits_det  # noqa: E402

TOOL = 'tools/analysis_tools/small_batch_detection.py'
CONFIG = REPO / 'configs' / 'small_batch_det' / 'faster-rcnn_r18-w32_fpn_4conv1fc-bn-all_digits.py'
PROBES_JSON = 'small_batch_detection_probes.json'
RESULTS_JSON = 'small_batch_detection.json'
DOC = 'small_batch_detection.md'
PLOT = 'small_batch_detection.png'
PROBE_BEGIN = ('<!-- small-batch-det-probes:begin (written by '
               'tools/analysis_tools/small_batch_detection.py --probe; do not edit) -->')
PROBE_END = '<!-- small-batch-det-probes:end -->'
DOC_BEGIN = ('<!-- small-batch-det:begin (written by '
             'tools/analysis_tools/small_batch_detection.py; do not edit) -->')
DOC_END = '<!-- small-batch-det:end -->'

# ----------------------------------------------------------------------------- rows

# Each row: the norm (``kind`` plus CBN arguments, the window filled in per batch), the
# images per micro-batch (``batch``: 'small', 'large' or a number) and the micro-batches
# per optimizer step (``accum``). CBN rows need the layer options named in ``needs``.
ROWS = {
    'bn-large': dict(label='BN, large batch', kind='bn', batch='large'),
    'bn': dict(label='BN', kind='bn', batch='small'),
    'gn': dict(label='GN', kind='gn', batch='small'),
    'naive-cbn': dict(label='naive CBN', kind='cbn', batch='small', cbn=dict(rho=0.0)),
    'cbn-paper': dict(label='CBN (paper)', kind='cbn', batch='small',
                      cbn=dict(mode='paper'), needs=('mode',)),
    'cbn': dict(label='CBN (new defaults)', kind='cbn', batch='small', cbn={},
                needs=('mode',)),
    'bn-4': dict(label='BN, 4 images', kind='bn', batch=4),
    'bn-2': dict(label='BN, 2 images', kind='bn', batch=2),
    'bn-accum': dict(label='BN, 1 x 4 accumulated', kind='bn', batch=1, accum=4),
    'cbn-accum': dict(label='CBN (new defaults), 1 x 4 accumulated', kind='cbn', batch=1,
                      accum=4, cbn={}, needs=('mode',)),
    # Not in the default comparison: the accumulation row with a longer window (k steps of
    # 4 images), to see whether pooling more past steps closes its gap to BN at 4 images.
    'cbn-accum-k4': dict(label='CBN (new defaults), 1 x 4 accumulated, k=4', kind='cbn',
                         batch=1, accum=4, cbn={}, window=4, needs=('mode',)),
    'cbn-accum-k8': dict(label='CBN (new defaults), 1 x 4 accumulated, k=8', kind='cbn',
                         batch=1, accum=4, cbn={}, window=8, needs=('mode',)),
}
DEFAULT_ROWS = [row for row in ROWS if 'window' not in ROWS[row]]

GN_GROUPS = 8


def layer_supports(option: str) -> bool:
    """Whether the installed CBN layer takes ``option`` (the new modes are recent)."""
    import inspect
    from cbn_plugin.layer import CrossIterationBatchNorm2d
    return option in inspect.signature(CrossIterationBatchNorm2d.__init__).parameters


# ----------------------------------------------------------------------------- setting

# The knobs that define a setting: data (canvas size, counts, difficulty), model width and
# the training budget (images seen, learning rate per image).
SETTING_DEFAULTS = dict(size=128, num_train=1600, num_val=300, digits=[3, 6], digit_px=None,
                        clutter=[3, 8], width=32, images=2400, lr_per_image=0.01,
                        warmup=0.05, burn_in=0.1, data_seed=0, large=4, small=1)


def setting_from_args(args) -> dict:
    s = {k: getattr(args, k) for k in SETTING_DEFAULTS}
    if s['digit_px'] is None:  # the demo's 16-40 px at 128 px, scaled with the canvas
        s['digit_px'] = [max(6, round(16 * s['size'] / 128)), round(40 * s['size'] / 128)]
    s['digits'], s['clutter'], s['digit_px'] = (list(s['digits']), list(s['clutter']),
                                                list(s['digit_px']))
    return s


def data_key(s: dict) -> dict:
    return dict(size=s['size'], num_train=s['num_train'], num_val=s['num_val'],
                digits=s['digits'], digit_px=s['digit_px'], clutter=s['clutter'],
                seed=s['data_seed'], version=make_digits_det.FORMAT_VERSION)


def setting_name(s: dict) -> str:
    return (f'{s["size"]}px w{s["width"]} {s["images"]} img, digits {s["digits"][0]}-'
            f'{s["digits"][1]} of {s["digit_px"][0]}-{s["digit_px"][1]}px, clutter '
            f'{s["clutter"][0]}-{s["clutter"][1]}, train {s["num_train"]}, lr '
            f'{s["lr_per_image"]:g}/image')


def ensure_data(root: Path, s: dict) -> Path:
    """Write the digits set for this setting under ``root/<hash>`` unless it is there."""
    key = data_key(s)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    out = root / f'{s["size"]}px_{digest}'
    manifest = out / 'manifest.json'
    if manifest.is_file() and json.loads(manifest.read_text()) == key:
        return out
    make_digits_det.build(out, num_train=s['num_train'], num_val=s['num_val'], size=s['size'],
                          seed=s['data_seed'], digits_per_image=tuple(s['digits']),
                          digit_size=tuple(s['digit_px']), clutter=tuple(s['clutter']))
    manifest.write_text(json.dumps(key, sort_keys=True) + '\n')
    return out


# ----------------------------------------------------------------------------- one run


def norm_cfg(spec: dict) -> dict:
    kind = spec['kind']
    if kind == 'bn':
        return dict(type='BN', requires_grad=True)
    if kind == 'gn':
        return dict(type='GN', num_groups=GN_GROUPS, requires_grad=True)
    return dict(type='CBN', requires_grad=True, **spec['cbn_args'])


def training_of(row: str, setting: dict) -> dict:
    """What a row trains in ``setting``: images per micro-batch, micro-batches per step,
    images per step and the norm (CBN's window spans the large batch unless the row
    fixes it)."""
    r = ROWS[row]
    batch = r['batch']
    batch = setting['small'] if batch == 'small' else setting['large'] if batch == 'large' \
        else batch
    accum = r.get('accum', 1)
    per_step = batch * accum
    norm = dict(kind=r['kind'])
    if r['kind'] == 'cbn':
        window = r.get('window', max(2, setting['large'] // per_step))
        norm['cbn_args'] = dict(r['cbn'], window_size=window)
    return dict(batch=batch, accum=accum, images_per_step=per_step, norm=norm)


def distinct_rows(rows: list[str], setting: dict) -> tuple[list[str], dict[str, str]]:
    """``rows`` without those that would train exactly an earlier row's runs (with
    ``--large 4``, 'BN, 4 images' is 'BN, large batch'); and which row each one repeats."""
    kept, repeats, seen = [], {}, {}
    for row in rows:
        key = json.dumps(training_of(row, setting), sort_keys=True)
        if key in seen:
            repeats[row] = seen[key]
        else:
            seen[key] = row
            kept.append(row)
    return kept, repeats


def make_job(row: str, setting: dict, seed: int, data_root: Path, work_root: Path,
             group: str = 'compare') -> dict:
    """Everything a run needs, as plain json (a child process gets it on its command line)."""
    t = training_of(row, setting)
    return dict(group=group, row=row, label=ROWS[row]['label'], seed=seed, batch=t['batch'],
                accum=t['accum'], images_per_step=t['images_per_step'], setting=setting,
                norm=t['norm'], data_root=str(data_root),
                work_dir=str(work_root / f'{row}_b{t["batch"]}x{t["accum"]}_s{seed}'))


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
    m.backbone.norm_cfg = dict(norm)
    m.neck.in_channels = [w, 2 * w, 4 * w, 8 * w]
    m.neck.out_channels = fpn
    m.neck.norm_cfg = dict(norm)
    m.rpn_head.in_channels = m.rpn_head.feat_channels = fpn
    m.roi_head.bbox_roi_extractor.out_channels = fpn
    m.roi_head.bbox_head.in_channels = m.roi_head.bbox_head.conv_out_channels = fpn
    m.roi_head.bbox_head.fc_out_channels = 8 * w
    m.roi_head.bbox_head.norm_cfg = dict(norm)

    root = job['data_root'].rstrip('/') + '/'
    for pipeline in (cfg.train_dataloader.dataset.pipeline, cfg.val_dataloader.dataset.pipeline):
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
        cfg.custom_hooks = [dict(type='CBNHook', burn_in_iters=burn_in)]
    cfg.work_dir = job['work_dir']
    cfg.randomness = dict(seed=job['seed'], deterministic=False)
    interval = max(1, iters // 10)
    cfg.default_hooks.logger.interval = interval
    cfg.log_processor.window_size = interval
    cfg.default_hooks.visualization = dict(type='DetVisualizationHook', draw=False)
    return cfg


def make_recorder():
    from mmengine.hooks import Hook

    class Recorder(Hook):
        """Training loss per iteration, the val metrics, and when validation began."""
        priority = 'LOWEST'

        def __init__(self):
            self.losses, self.metrics, self.val_start = [], {}, None

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if outputs and 'loss' in outputs:
                self.losses.append(float(outputs['loss'].detach()))

        def before_val(self, runner):
            self.val_start = time.perf_counter()

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = dict(metrics or {})

    return Recorder()


def loss_curve(losses: list[float], points: int = 40) -> list[float]:
    """Mean loss over ``points`` equal spans of training (images seen)."""
    if not losses:
        return []
    n = len(losses)
    edges = [round(i * n / points) for i in range(points + 1)]
    return [sum(losses[a:b]) / (b - a) for a, b in zip(edges, edges[1:]) if b > a]


def _cpu_seconds() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(job: dict, started: float | None = None) -> dict:
    """Train and validate one job in this process (one torch thread); return its result.

    ``wall_s`` depends on what else the machine runs; ``cpu_s`` (this process's CPU time
    over the same span, one thread) is the cost on an idle core."""
    start = started or time.perf_counter()
    cpu_start = 0.0 if started else _cpu_seconds()
    import torch
    torch.set_num_threads(1)
    import cbn_plugin  # noqa: F401  (registers CBN and CBNHook)
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner
    register_all_modules(init_default_scope=False)
    cfg = build_config(job)
    runner = Runner.from_cfg(cfg)
    recorder = make_recorder()
    runner.register_hook(recorder, priority='LOWEST')
    train_start = time.perf_counter()
    status = 'ok'
    try:
        runner.train()  # validates after the last iteration (val_interval = max_iters)
    except Exception as exc:  # a diverged or crashed run is a result too
        status = f'{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ""}'
    end = time.perf_counter()
    m, losses = recorder.metrics, recorder.losses
    # What the CBN layers did: optimizer steps counted, and the window they hold at the end
    # (past steps recorded + the current one).
    layers = [layer for _, layer in cbn_plugin.cbn_layers(runner.model)]
    cbn = dict(layers=len(layers), steps=sorted({layer.steps_done for layer in layers}),
               window=sorted({int(layer.window_filled.max()) + 1 for layer in layers})) \
        if layers else None
    val_start = recorder.val_start or end
    tail = losses[-max(1, len(losses) // 10):]
    nan = float('nan')
    return dict(job=job, status=status if m or status != 'ok' else 'no val metrics',
                mAP=m.get('coco/bbox_mAP', nan), mAP50=m.get('coco/bbox_mAP_50', nan),
                mAP75=m.get('coco/bbox_mAP_75', nan),
                final_loss=sum(tail) / len(tail) if tail else nan,
                loss_curve=loss_curve(losses), iters=cfg.train_cfg.max_iters,
                lr=cfg.optim_wrapper.optimizer.lr,
                train_s=val_start - train_start, val_s=end - val_start, wall_s=end - start,
                cpu_s=_cpu_seconds() - cpu_start, load_end=_load(), cbn=cbn)


# ----------------------------------------------------------------------------- jobs


def _child_env() -> dict:
    env = dict(os.environ)
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
        env[var] = '1'
    return env


def _cost(job: dict) -> float:
    return (job['setting']['images'] * (1.4 if job['norm']['kind'] == 'cbn' else 1.0)
            * (1.2 if job['batch'] == 1 else 1.0))


def _saved_result(job: dict) -> dict | None:
    """The result an earlier run of exactly this job left in its work dir, if any."""
    out = Path(job['work_dir']) / 'result.json'
    if out.is_file():
        result = json.loads(out.read_text())
        if result.get('job') == job and result.get('status') == 'ok':
            return result
    return None


def run_jobs(jobs: list[dict], workers: int, log=print, reuse: bool = False) -> list[dict]:
    """Run the jobs (costliest first), ``workers`` child processes at a time (0: in this
    process). With ``reuse``, a job whose finished result is already in its work dir is not
    run again. Returns the results in the jobs' order."""
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    results: dict[int, dict] = {}
    if reuse:
        for i in order:
            saved = _saved_result(jobs[i])
            if saved is not None:
                results[i] = saved
                log(f'reusing {jobs[i]["work_dir"]}/result.json')
        order = [i for i in order if i not in results]
    start = time.perf_counter()

    def report(i):
        r = results[i]
        j = r['job']
        log(f'[{len(results)}/{len(jobs)} {time.perf_counter() - start:5.0f}s] {j["label"]:38s} '
            f'{j["batch"]}x{j["accum"]} seed {j["seed"]}: mAP {r["mAP"]:.3f} mAP50 '
            f'{r["mAP50"]:.3f} loss {r["final_loss"]:.3f} {r["wall_s"]:.0f}s '
            f'({r["iters"]} it) {r["status"]}')

    if workers <= 0:
        for i in order:
            results[i] = run_one(jobs[i])
            Path(jobs[i]['work_dir']).mkdir(parents=True, exist_ok=True)
            (Path(jobs[i]['work_dir']) / 'result.json').write_text(
                json.dumps(results[i], default=float) + '\n')
            report(i)
        return [results[i] for i in range(len(jobs))]
    pending, running = list(order), {}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            job = jobs[i]
            Path(job['work_dir']).mkdir(parents=True, exist_ok=True)
            out = Path(job['work_dir']) / 'result.json'
            if out.exists():
                out.unlink()
            log_file = open(Path(job['work_dir']) / 'run.log', 'w')
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), '--run-job', json.dumps(job),
                 '--result', str(out)], stdout=log_file, stderr=subprocess.STDOUT,
                env=_child_env(), cwd=str(REPO))
            running[i] = (proc, log_file, out, time.perf_counter())
        time.sleep(1.0)
        for i, (proc, log_file, out, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log_file.close()
            del running[i]
            if out.is_file():
                results[i] = json.loads(out.read_text())
            else:
                nan = float('nan')
                results[i] = dict(job=jobs[i], status=f'child exit {proc.returncode} (see '
                                  f'{log_file.name})', mAP=nan, mAP50=nan, mAP75=nan,
                                  final_loss=nan, loss_curve=[], iters=0, lr=nan, train_s=nan,
                                  val_s=nan, wall_s=time.perf_counter() - t0, cpu_s=nan,
                                  load_end=_load())
            report(i)
    return [results[i] for i in range(len(jobs))]


# ----------------------------------------------------------------------------- report


def _stats(values):
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return float('nan'), float('nan'), 0
    return sum(vals) / len(vals), max(vals) - min(vals), len(vals)


def summarise(results: list[dict], rows: list[str]) -> list[dict]:
    """Per row: mean and spread (max - min over seeds) of mAP and mAP50, mean wall time."""
    out = []
    for row in rows:
        rs = [r for r in results if r['job']['row'] == row]
        if not rs:
            continue
        j = rs[0]['job']
        mAP, mAP_spread, n = _stats([r['mAP'] for r in rs])
        mAP50, mAP50_spread, _ = _stats([r['mAP50'] for r in rs])
        wall, _, _ = _stats([r['wall_s'] for r in rs])
        cpu, _, _ = _stats([r.get('cpu_s', float('nan')) for r in rs])
        loss, _, _ = _stats([r['final_loss'] for r in rs])
        out.append(dict(row=row, label=j['label'], batch=j['batch'], accum=j['accum'],
                        window=j['norm'].get('cbn_args', {}).get('window_size'),
                        lr=rs[0]['lr'], iters=rs[0]['iters'], seeds=len(rs), finished=n,
                        mAP=mAP, mAP_spread=mAP_spread, mAP50=mAP50, mAP50_spread=mAP50_spread,
                        final_loss=loss, wall_s=wall, cpu_s=cpu,
                        per_seed=[dict(seed=r['job']['seed'], mAP=r['mAP'], mAP50=r['mAP50'],
                                       wall_s=r['wall_s'], status=r['status']) for r in rs]))
    return out


def _f(x, digits=3):
    return f'{x:.{digits}f}' if isinstance(x, (int, float)) and math.isfinite(x) else 'fails'


def md_table(head, rows) -> str:
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def summary_table(summary: list[dict]) -> str:
    head = ('row', 'images x steps', 'k', 'lr', 'mAP', 'spread', 'mAP50', 'spread',
            'final loss', 'wall per run', 'CPU per run')
    rows = []
    for s in summary:
        failed = '' if s['finished'] == s['seeds'] else f' ({s["seeds"] - s["finished"]} failed)'
        rows.append((s['label'], f'{s["batch"]} x {s["accum"]}' if s['accum'] > 1
                     else str(s['batch']), s['window'] or '-', f'{s["lr"]:.4g}',
                     _f(s['mAP']) + failed, _f(s['mAP_spread']), _f(s['mAP50']),
                     _f(s['mAP50_spread']), _f(s['final_loss']), f'{s["wall_s"]:.0f} s',
                     _secs(s['cpu_s'])))
    return md_table(head, rows)


def goals(summary: list[dict], setting: dict) -> list[str]:
    """The issue's goals, checked on the table: CBN with the defaults at the small batch
    within 1 mAP point of BN at the large batch and ahead of GN and of BN at the same
    batch; CBN 1 x 4 accumulated equal to BN at 4 images within the seed spread."""
    by = {x['row']: x for x in summary if math.isfinite(x['mAP'])}
    out = []
    if 'cbn' in by:
        cbn = by['cbn']
        parts = [f'{(cbn["mAP"] - by[row]["mAP"]) * 100:+.1f} against {by[row]["label"]}'
                 for row in ('bn-large', 'bn-2', 'gn', 'bn') if row in by]
        missed = [f'more than 1 point under {by["bn-large"]["label"]}'] \
            if 'bn-large' in by and cbn['mAP'] < by['bn-large']['mAP'] - 0.01 else []
        missed += [f'not ahead of {by[row]["label"]}' for row in ('gn', 'bn')
                   if row in by and cbn['mAP'] <= by[row]['mAP']]
        out.append(f'- CBN (new defaults) at {cbn["batch"]} image(s) per step, mAP points: '
                   + ', '.join(parts) + '. Goal (within 1 point of BN at the large batch, '
                   f'ahead of GN and of BN at the same batch): '
                   + ('met.' if not missed else f'not met ({"; ".join(missed)}).'))
    # BN at 4 images; in a setting where that is another row's run, that row
    target = distinct_rows(list(ROWS), setting)[1].get('bn-4', 'bn-4')
    if 'cbn-accum' in by and target in by:
        a, t = by['cbn-accum'], by[target]
        spread = max(a['mAP_spread'], t['mAP_spread'])
        gap = a['mAP'] - t['mAP']
        bn = by.get('bn-accum')
        out.append(f'- CBN 1 x 4 accumulated minus BN at 4 images: {gap * 100:+.1f} mAP '
                   f'points, the larger seed spread of the two {spread * 100:.1f}'
                   + (f' (BN 1 x 4 accumulated: {(bn["mAP"] - t["mAP"]) * 100:+.1f})'
                      if bn else '') + '. Goal (equal within the seed spread): '
                   f'{"met" if abs(gap) <= spread else "not met"}.')
    return out


def render(run: dict) -> str:
    s = run['setting']
    summary = summarise(run['results'], run['rows'])
    checks = goals(summary, s)
    return '\n'.join([
        '',
        f'Generated by `{run["command"]}` on {run["when"]}: {len(run["results"])} runs, '
        f'{run["workers"]} at a time (one torch thread each), total {run["wall_s"] / 60:.1f} '
        f'min on {run["machine"]}; load average {run["load_start"]} at the start, '
        f'{run["load_end"]} at the end.',
        '',
        f'Setting: {setting_name(s)}; large batch {s["large"]}, small batch {s["small"]}; '
        f'lr {s["lr_per_image"]:g} per image per step (linear scaling), warm-up '
        f'{s["warmup"]:.0%} and CBN burn-in {s["burn_in"]:.0%} of the iterations, lr x0.1 at '
        f'80 % and 93 %; seeds {run["seeds"]}. mAP and mAP50: COCO box AP on the '
        f'{s["num_val"]} val canvases (unseen digits); spread: max - min over seeds; wall '
        f'per run: process start to val metrics, mean over seeds; CPU per run: that '
        f'process\'s CPU time (one thread: the wall time on an idle core).',
        '',
        summary_table(summary),
        '',
        *(checks + [''] if checks else []),
        f'![mAP per row]({PLOT})',
        '',
    ])


def plot(run: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    summary = summarise(run['results'], run['rows'])
    fig, (ax_map, ax_loss) = plt.subplots(1, 2, figsize=(max(13.0, 6.5 + 0.9 * len(summary)), 5.5),
                                          gridspec_kw=dict(width_ratios=(1.4, 1)))
    x = list(range(len(summary)))
    for dx, key, name in ((-0.2, 'mAP', 'mAP'), (0.2, 'mAP50', 'mAP50')):
        ax_map.bar([i + dx for i in x], [s[key] for s in summary], 0.4, label=name)
        for i, s in enumerate(summary):
            seeds = [p[key] for p in s['per_seed'] if math.isfinite(p[key])]
            ax_map.plot([i + dx] * len(seeds), seeds, 'k.', markersize=4)
            ax_map.annotate(_f(s[key]), (i + dx, s[key] if math.isfinite(s[key]) else 0),
                            ha='center', va='bottom', fontsize=7, xytext=(0, 3),
                            textcoords='offset points')
    ax_map.set_xticks(x, [s['label'] for s in summary], fontsize=7, rotation=30, ha='right',
                      rotation_mode='anchor')
    ax_map.set_ylabel('COCO box AP on val (dots: seeds)')
    ax_map.set_ylim(0, 1.1)
    ax_map.legend(loc='upper right', ncol=2, fontsize=8)
    for s in summary:
        curves = [r['loss_curve'] for r in run['results']
                  if r['job']['row'] == s['row'] and r['loss_curve']]
        if curves:
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            ax_loss.plot([(i + 0.5) / n for i in range(n)], mean, label=s['label'], linewidth=1)
    ax_loss.set_xlabel('fraction of training (images seen)')
    ax_loss.set_ylabel('training loss (mean over seeds)')
    ax_loss.set_yscale('log')
    ax_loss.legend(fontsize=7)
    st = run['setting']
    fig.suptitle(f'Faster R-CNN from scratch, every norm layer swapped, digits '
                 f'{st["size"]} px, {st["images"]} images seen')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def probe_table(probes: list[dict]) -> str:
    """One line per setting: BN mAP / mAP50 / wall at each batch, and the drop."""
    settings: dict[str, dict] = {}
    for p in probes:
        key = json.dumps(p['setting'], sort_keys=True)
        settings.setdefault(key, dict(setting=p['setting'], runs=[]))['runs'].append(p)
    rows = []
    for entry in settings.values():
        s, runs = entry['setting'], entry['runs']
        by_batch = {}
        for r in runs:
            by_batch.setdefault(r['batch'], []).append(r)
        large = _stats([r['mAP'] for r in by_batch.get(s['large'], [])])[0]  # nan: not run
        for b in sorted(by_batch, reverse=True):
            rs = by_batch[b]
            mAP = _stats([r['mAP'] for r in rs])[0]
            if len(rs) > 1:  # every seed's value after the mean
                mAP_text = _f(mAP) + ' (' + ', '.join(_f(r['mAP']) for r in rs) + ')'
            else:
                mAP_text = _f(mAP)
            drop = (large - mAP) * 100 if b != s['large'] else float('nan')
            rows.append((f'{setting_name(s)}, large {s["large"]}', b, rs[0]['iters'],
                         f'{s["lr_per_image"] * b:.4g}', len(rs),
                         mAP_text, _f(_stats([r['mAP50'] for r in rs])[0]),
                         _f(drop, 1) if b != s['large'] else '-',
                         f'{_stats([r["wall_s"] for r in rs])[0]:.0f} s',
                         _secs(_stats([r.get('cpu_s', float('nan')) for r in rs])[0]),
                         ' / '.join(str(r.get('load_end', '?')).split()[0] for r in rs),
                         '; '.join(sorted({r['status'] for r in rs}))))
    return md_table(('setting', 'BN batch', 'steps', 'lr', 'seeds', 'mAP', 'mAP50',
                     'drop vs large (mAP points)', 'wall per run', 'CPU per run',
                     'load at end', 'status'), rows)


def _secs(x) -> str:
    return f'{x:.0f} s' if math.isfinite(x) else 'n/a'


def render_probes(saved: dict) -> str:
    return '\n'.join(['', f'Every BN-only probe run so far (`{PROBES_JSON}`; one line per '
                      'setting and batch, mean over the seeds run; wall per run: process '
                      'start to val metrics, one torch thread, machine load in the json):', '',
                      probe_table(saved['probes']), ''])


def write_block(path: Path, begin: str, end: str, block: str, title: str) -> None:
    text = path.read_text() if path.is_file() else f'# {title}\n'
    new = f'{begin}\n{block}\n{end}'
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + '.*?' + re.escape(end), lambda _: new, text,
                      flags=re.S)
    else:
        text = text.rstrip('\n') + '\n\n' + new + '\n'
    path.write_text(text)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n', 1)[1])
    ap.add_argument('--probe', action='store_true',
                    help='BN-only probes at --batches; appended to the probes json')
    ap.add_argument('--batches', type=int, nargs='+', default=[8, 2, 1],
                    help='--probe: the BN batches (drops are measured against --large\'s)')
    ap.add_argument('--rows', nargs='+', choices=list(ROWS), default=DEFAULT_ROWS)
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    ap.add_argument('--workers', type=int, default=2,
                    help='child processes at a time, one torch thread each; 0: in this process')
    ap.add_argument('--reuse', action='store_true',
                    help='keep the finished results already in the work dirs of identical jobs '
                    '(resume an interrupted study)')
    ap.add_argument('--tiny', action='store_true',
                    help='a tiny data set and a few iterations: the pipeline in seconds')
    ap.add_argument('--from-json', action='store_true',
                    help='no training: re-render the md and the plot from the jsons in --out-dir')
    ap.add_argument('--out-dir', type=Path, default=REPO / 'docs')
    ap.add_argument('--data-root', type=Path, default=REPO / 'data' / 'small_batch_det')
    ap.add_argument('--work-dir', type=Path, default=REPO / 'work_dirs' / 'small_batch_det')
    g = ap.add_argument_group('setting')
    g.add_argument('--size', type=int, default=SETTING_DEFAULTS['size'], help='canvas px')
    g.add_argument('--num-train', type=int, default=SETTING_DEFAULTS['num_train'])
    g.add_argument('--num-val', type=int, default=SETTING_DEFAULTS['num_val'])
    g.add_argument('--digits', type=int, nargs=2, default=SETTING_DEFAULTS['digits'],
                   help='digits per canvas, min max')
    g.add_argument('--digit-px', type=int, nargs=2, default=None,
                   help='digit height in px, min max (default: 16-40 scaled by size/128)')
    g.add_argument('--clutter', type=int, nargs=2, default=SETTING_DEFAULTS['clutter'],
                   help='distractors per canvas, min max')
    g.add_argument('--width', type=int, default=SETTING_DEFAULTS['width'],
                   help='backbone base channels (FPN and box head: 2x, fc: 8x)')
    g.add_argument('--images', type=int, default=SETTING_DEFAULTS['images'],
                   help='training images seen by every run')
    g.add_argument('--lr-per-image', type=float, default=SETTING_DEFAULTS['lr_per_image'],
                   help='lr = this x images per optimizer step')
    g.add_argument('--warmup', type=float, default=SETTING_DEFAULTS['warmup'],
                   help='linear warm-up, fraction of the iterations')
    g.add_argument('--burn-in', type=float, default=SETTING_DEFAULTS['burn_in'],
                   help='CBN burn-in (plain BN), fraction of the iterations')
    g.add_argument('--data-seed', type=int, default=SETTING_DEFAULTS['data_seed'])
    g.add_argument('--large', type=int, default=SETTING_DEFAULTS['large'],
                   help='large reference batch (images per step)')
    g.add_argument('--small', type=int, default=SETTING_DEFAULTS['small'],
                   help='the small batch of the comparison rows')
    ap.add_argument('--run-job', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--result', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:  # tiny defaults; options given on the command line still win
        ap.set_defaults(size=64, num_train=8, num_val=4, images=8, width=8, seeds=[0], large=4,
                        batches=[4, 2])
        args = ap.parse_args(argv)
    return args


def _load() -> str:
    return ' '.join(f'{v:.2f}' for v in os.getloadavg())


def _meta(argv) -> dict:
    import torch
    args = sys.argv[1:] if argv is None else list(argv)
    return dict(command=' '.join(['python', TOOL] + args), when=time.strftime('%Y-%m-%d %H:%M'),
                machine=f'{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}',
                load_start=_load())


def main(argv=None):
    args = parse_args(argv)
    if args.run_job:  # a child process: one run
        started = time.perf_counter()
        result = run_one(json.loads(args.run_job), started)
        Path(args.result).write_text(json.dumps(result, default=float) + '\n')
        return result
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = out_dir / DOC
    title = 'Small-batch detection: BN, GN and CBN in every norm layer of a Faster R-CNN'
    if args.from_json:
        probes_path, results_path = out_dir / PROBES_JSON, out_dir / RESULTS_JSON
        if probes_path.is_file():
            write_block(doc, PROBE_BEGIN, PROBE_END,
                        render_probes(json.loads(probes_path.read_text())), title)
        if results_path.is_file():
            run = json.loads(results_path.read_text())
            plot(run, out_dir / PLOT)
            write_block(doc, DOC_BEGIN, DOC_END, render(run), title)
        return None

    setting = setting_from_args(args)
    meta = _meta(argv)
    t0 = time.perf_counter()
    data_root = ensure_data(args.data_root, setting)
    if args.probe:
        setting['small'] = None  # probes: any batches, compared with --large's
        digest = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]
        jobs = [make_job('bn', dict(setting, small=b), seed, data_root,
                         args.work_dir / 'probes' / digest, group='probe')
                for b in args.batches for seed in args.seeds]
        results = run_jobs(jobs, args.workers, log=lambda s: print(s, flush=True),
                           reuse=args.reuse)
        path = out_dir / PROBES_JSON
        saved = json.loads(path.read_text()) if path.is_file() else dict(probes=[])
        fresh = []
        for r in results:
            entry = dict(setting=setting, batch=r['job']['batch'], seed=r['job']['seed'],
                         mAP=r['mAP'], mAP50=r['mAP50'], mAP75=r['mAP75'],
                         final_loss=r['final_loss'], iters=r['iters'], lr=r['lr'],
                         train_s=r['train_s'], val_s=r['val_s'], wall_s=r['wall_s'],
                         cpu_s=r.get('cpu_s', float('nan')), status=r['status'],
                         workers=args.workers, **meta, load_end=r.get('load_end', _load()))
            fresh.append(entry)
        keys = {(json.dumps(e['setting'], sort_keys=True), e['batch'], e['seed']) for e in fresh}
        saved['probes'] = [e for e in saved['probes'] if (json.dumps(
            e['setting'], sort_keys=True), e['batch'], e['seed']) not in keys] + fresh
        path.write_text(json.dumps(saved, indent=1, default=float) + '\n')
        write_block(doc, PROBE_BEGIN, PROBE_END, render_probes(saved), title)
        print(probe_table([e for e in saved['probes'] if e['setting'] == setting]))
        return saved

    missing = sorted({opt for row in args.rows for opt in ROWS[row].get('needs', ())
                      if not layer_supports(opt)})
    if missing:
        raise SystemExit(f'the installed CBN layer lacks {missing}: rows '
                         f'{[r for r in args.rows if ROWS[r].get("needs")]} need the new CBN '
                         'modes; pass --rows without them')
    rows, repeats = distinct_rows(args.rows, setting)
    for row, same in repeats.items():
        print(f'row {row!r} trains the same runs as {same!r} in this setting: run once',
              flush=True)
    jobs = [make_job(row, setting, seed, data_root, args.work_dir / 'compare')
            for seed in args.seeds for row in rows]
    print(f'{len(jobs)} runs, {args.workers} at a time; setting: {setting_name(setting)}',
          flush=True)
    results = run_jobs(jobs, args.workers, log=lambda s: print(s, flush=True),
                       reuse=args.reuse)
    run = dict(meta, setting=setting, rows=rows, seeds=args.seeds, workers=args.workers,
               wall_s=time.perf_counter() - t0, load_end=_load(), results=results)
    (out_dir / RESULTS_JSON).write_text(json.dumps(run, indent=1, default=float) + '\n')
    plot(run, out_dir / PLOT)
    write_block(doc, DOC_BEGIN, DOC_END, render(run), title)
    print(summary_table(summarise(results, rows)))
    bad = [r['job']['label'] for r in results if r['status'] != 'ok']
    if bad:
        print(f'runs that did not finish: {bad}', flush=True)
    return run


if __name__ == '__main__':
    main()
