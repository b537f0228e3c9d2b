"""Pretrained-backbone detection study: the digits detector fine-tuned from a backbone
pretrained here, with the backbone's norms frozen or trained and BN, GN or CBN (or no norm)
in the FPN and the 4-conv box head.

The detector is the small-batch study's (``configs/small_batch_det/``; data, schedule,
linear learning-rate scaling and job layout are that study's, imported from
``tools/analysis_tools/small_batch_detection.py``); the backbone starts from the
checkpoint ``tools/analysis_tools/pretrain_backbone.py`` builds (a digit classifier over
the detection train pool's digits, BN or its GN twin), loaded as users load ImageNet
weights: ``backbone.init_cfg=dict(type='Pretrained', checkpoint=...)``. The rows:

    a  BN backbone, frozen (norm_eval=True)   no norm in neck and head   (mmdet's default)
    b  BN, frozen                             BN
    c  BN, frozen                             GN
    d  BN, frozen                             CBN (defaults)             (the paper's placement)
    e  BN, frozen                             CBN (mode='paper')
    f  BN, trained                            BN
    g  CBN, trained, from the BN weights      CBN
    h  GN, trained, from the GN twin          GN
    i  BN, trained, at the large batch        BN                         (the target)

Every row but i trains at ``--small`` images per step; every run sees ``--images`` images.
"Frozen" is mmdet's recipe: ``norm_eval=True``, the norm's affine parameters fixed, and the
stem and the first ``--frozen-stages`` stages frozen whole; "trained" keeps the same
``frozen_stages`` and trains every other norm (statistics and affine).

    # BN-only probes (finding the setting); each call appends to the probes json
    .venv/bin/python tools/analysis_tools/pretrained_detection.py --probe --rows a b f i \\
        --images 1200 --lr-per-image 0.01 --workers 1
    # the comparison (rows x seeds)
    .venv/bin/python tools/analysis_tools/pretrained_detection.py --rows a b c d e f g h i
    # resume an interrupted study: runs whose result.json exists are not run again
    .venv/bin/python tools/analysis_tools/pretrained_detection.py ... --reuse
    # seconds: the pipeline on a tiny set
    .venv/bin/python tools/analysis_tools/pretrained_detection.py --tiny --workers 0 \\
        --out-dir /tmp/ptd
    # re-render the md and the plot from the jsons, no training
    .venv/bin/python tools/analysis_tools/pretrained_detection.py --from-json

Probes are appended to ``docs/pretrained_detection_probes.json`` (a rerun of the same
setting, row and seed replaces its entry); the comparison writes
``docs/pretrained_detection.json`` and ``docs/pretrained_detection.png``. Each run is a
child process with one torch thread; its CPU time (the child's own, from the kernel) and
wall time are recorded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tools'))
sys.path.insert(0, str(REPO / 'tools' / 'analysis_tools'))

import pretrain_backbone  # noqa: E402
import small_batch_detection as sbd  # noqa: E402
from cbn_plugin import derived_window_size  # noqa: E402

TOOL = 'tools/analysis_tools/pretrained_detection.py'
PROBES_JSON = 'pretrained_detection_probes.json'
RESULTS_JSON = 'pretrained_detection.json'
DOC = 'pretrained_detection.md'
PLOT = 'pretrained_detection.png'
TITLE = 'Pretrained backbones: detection fine-tuned at 1 image per step'
PROBE_BEGIN = ('<!-- pretrained-det-probes:begin (written by '
               'tools/analysis_tools/pretrained_detection.py --probe; do not edit) -->')
PROBE_END = '<!-- pretrained-det-probes:end -->'
DOC_BEGIN = ('<!-- pretrained-det:begin (written by '
             'tools/analysis_tools/pretrained_detection.py; do not edit) -->')
DOC_END = '<!-- pretrained-det:end -->'

# ----------------------------------------------------------------------------- rows

# backbone: its norm, whether that norm trains, and which pretrained checkpoint it loads
# (a CBN backbone loads the BN weights: CBN is a _BatchNorm with BN's parameters and
# statistics). head: the norm of the FPN and the 4 box-head convs ('none': no norm).
ROWS = {
    'a': dict(label="a: BN frozen, no neck/head norm (mmdet's default)",
              backbone='bn', trained=False, head='none', batch='small'),
    'b': dict(label='b: BN frozen, BN head', backbone='bn', trained=False, head='bn',
              batch='small'),
    'c': dict(label='c: BN frozen, GN head', backbone='bn', trained=False, head='gn',
              batch='small'),
    'd': dict(label='d: BN frozen, CBN head (defaults)', backbone='bn', trained=False,
              head='cbn', cbn={}, batch='small'),
    'e': dict(label="e: BN frozen, CBN head (mode='paper')", backbone='bn', trained=False,
              head='cbn', cbn=dict(mode='paper'), batch='small'),
    'f': dict(label='f: BN trained, BN head', backbone='bn', trained=True, head='bn',
              batch='small'),
    'g': dict(label='g: CBN trained (from BN weights), CBN head', backbone='cbn', trained=True,
              head='cbn', cbn={}, batch='small'),
    'h': dict(label='h: GN trained (GN-pretrained), GN head', backbone='gn', trained=True,
              head='gn', batch='small'),
    'i': dict(label='i: BN trained, BN head, large batch', backbone='bn', trained=True,
              head='bn', batch='large'),
}
PRETRAINED_OF = dict(bn='bn', cbn='bn', gn='gn')  # the checkpoint each backbone norm loads


def is_baseline(row: str) -> bool:
    """No CBN anywhere (the rows the probes may run)."""
    return 'cbn' not in (ROWS[row]['backbone'], ROWS[row]['head'])


# ----------------------------------------------------------------------------- setting

# The small-batch study's setting plus what fine-tuning adds: the stages frozen whole and
# the pretraining recipe (its norm is the row's).
# 2,400 images: at 1,200 the large batch (300 steps of 4) had not converged (probes).
SETTING_DEFAULTS = dict(sbd.SETTING_DEFAULTS, images=2400, lr_per_image=0.01, frozen_stages=1)


# Pretraining options the study passes on (the norm is the row's; the width, the digit
# split's seed and fraction are the detector's own, so that the checkpoint fits it and
# never draws a detection val digit).
PRETRAIN_OPTIONS = [k for k in pretrain_backbone.RECIPE_DEFAULTS
                    if k not in ('norm', 'format', 'width', 'data_seed', 'val_fraction')]


def setting_from_args(args) -> dict:
    s = sbd.setting_from_args(args)
    s['frozen_stages'] = args.frozen_stages
    recipe = {k: getattr(args, 'pretrain_' + k) for k in PRETRAIN_OPTIONS
              if getattr(args, 'pretrain_' + k) is not None}
    recipe = pretrain_backbone.check_recipe(dict(recipe, width=s['width'],
                                                 data_seed=s['data_seed']))
    recipe.pop('norm')
    s['pretrain'] = recipe
    return s


def setting_name(s: dict) -> str:
    return (f'{sbd.setting_name(s)}, frozen stages {s["frozen_stages"]}, pretrained '
            f'{s["pretrain"]["images"]} crops')


def checkpoints(setting: dict, norms, root: Path, log=print) -> dict[str, str]:
    """The pretrained checkpoint of each norm in ``norms`` ('bn', 'gn'), built if missing."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # pretraining is a single-thread job like the runs
    try:
        return {n: str(pretrain_backbone.ensure_pretrained(dict(setting['pretrain'], norm=n),
                                                           root, log=log)) for n in norms}
    finally:
        torch.set_num_threads(threads)


def make_job(row: str, setting: dict, seed: int, data_root: Path, work_root: Path,
             ckpts: dict[str, str], group: str = 'compare', window_size: int | None = None
             ) -> dict:
    """Everything a run needs, as plain json (a child process gets it on its command line).
    CBN's window is ``window_size``, or the README's rule (about 32 images pooled) when None."""
    r = ROWS[row]
    batch = setting['small'] if r['batch'] == 'small' else setting['large']
    window = derived_window_size(batch) if window_size is None else window_size
    cbn_args = dict(r.get('cbn', {}), window_size=window)
    head = dict(kind=r['head'])
    if r['head'] == 'cbn':
        head['cbn_args'] = cbn_args
    backbone = dict(kind=r['backbone'], trained=r['trained'],
                    checkpoint=ckpts[PRETRAINED_OF[r['backbone']]])
    if r['backbone'] == 'cbn':
        backbone['cbn_args'] = cbn_args
    name = f'{row}_b{batch}_s{seed}' if is_baseline(row) else f'{row}_b{batch}_k{window}_s{seed}'
    return dict(group=group, row=row, label=r['label'], seed=seed, batch=batch, accum=1,
                images_per_step=batch, setting=setting, norm=head, backbone=backbone,
                data_root=str(data_root), work_dir=str(work_root / name))


def build_config(job: dict):
    """The small-batch study's config of this batch and schedule, then the backbone loaded
    from the pretrained checkpoint with its norm frozen or trained, and the neck and head
    norm of the row."""
    head = job['norm']
    cfg = sbd.build_config(dict(job, norm=head if head['kind'] != 'none' else dict(kind='bn')))
    m = cfg.model
    if head['kind'] == 'none':
        m.neck.norm_cfg = None
        m.roi_head.bbox_head.norm_cfg = None
    bb = job['backbone']
    if bb['trained']:
        m.backbone.norm_cfg = sbd.norm_cfg(bb)
        m.backbone.norm_eval = False
    else:  # mmdet's recipe for ImageNet BN weights
        m.backbone.norm_cfg = dict(type='BN', requires_grad=False)
        m.backbone.norm_eval = True
    m.backbone.frozen_stages = job['setting']['frozen_stages']
    m.backbone.init_cfg = dict(type='Pretrained', checkpoint=bb['checkpoint'])
    if 'cbn' in (bb['kind'], head['kind']) and not cfg.get('custom_hooks'):
        iters = cfg.train_cfg.max_iters
        cfg.custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
        cfg.custom_hooks = [dict(type='CBNHook', burn_in_iters=min(
            round(job['setting']['burn_in'] * iters), iters - 1))]
    return cfg


# ----------------------------------------------------------------------------- one run


def _cpu_seconds() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load() -> str:
    return ' '.join(f'{v:.2f}' for v in os.getloadavg())


def make_load_check(checkpoint: str):
    """A hook that records, before the first iteration, whether the backbone holds the
    checkpoint's weights (that the init_cfg did load them)."""
    import torch
    from mmengine.hooks import Hook

    class LoadCheck(Hook):
        priority = 'VERY_HIGH'

        def __init__(self):
            self.loaded = None

        def before_train(self, runner):
            state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict']
            own = runner.model.backbone.state_dict()
            self.loaded = all(k in own and torch.equal(own[k], v) for k, v in state.items()
                              if k.endswith(('weight', 'bias', 'running_mean', 'running_var')))

    return LoadCheck()


def run_one(job: dict) -> dict:
    """Train and validate one job in this process (one torch thread); return its result."""
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    import torch
    torch.set_num_threads(1)
    import cbn_plugin
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner
    register_all_modules(init_default_scope=False)
    cfg = build_config(job)
    runner = Runner.from_cfg(cfg)
    recorder, load_check = sbd.make_recorder(), make_load_check(job['backbone']['checkpoint'])
    runner.register_hook(recorder, priority='LOWEST')
    runner.register_hook(load_check, priority='VERY_HIGH')
    train_start = time.perf_counter()
    status = 'ok'
    try:
        runner.train()  # validates after the last iteration (val_interval = max_iters)
    except Exception as exc:  # a diverged or crashed run is a result too
        status = f'{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ""}'
    end = time.perf_counter()
    m, losses = recorder.metrics, recorder.losses
    layers = [layer for _, layer in cbn_plugin.cbn_layers(runner.model)]
    val_start = recorder.val_start or end
    tail = losses[-max(1, len(losses) // 10):]
    nan = float('nan')
    return dict(job=job, status=status if m or status != 'ok' else 'no val metrics',
                mAP=m.get('coco/bbox_mAP', nan), mAP50=m.get('coco/bbox_mAP_50', nan),
                mAP75=m.get('coco/bbox_mAP_75', nan),
                final_loss=sum(tail) / len(tail) if tail else nan,
                loss_curve=sbd.loss_curve(losses), iters=cfg.train_cfg.max_iters,
                lr=cfg.optim_wrapper.optimizer.lr, pretrained_loaded=load_check.loaded,
                train_s=val_start - train_start, val_s=end - val_start, wall_s=end - start,
                cpu_s=_cpu_seconds() - cpu_start, load_end=_load(),
                cbn=dict(layers=len(layers), steps=sorted({x.steps_done for x in layers}))
                if layers else None)


# ----------------------------------------------------------------------------- jobs


def _identity(job: dict) -> dict:
    """What a run trains: the job less its group (a probe run and a comparison run of the
    same row, setting and seed are the same run)."""
    return {k: v for k, v in job.items() if k != 'group'}


def saved_result(job: dict) -> dict | None:
    """The finished result an earlier run of exactly this job left in its work dir."""
    out = Path(job['work_dir']) / 'result.json'
    if out.is_file():
        result = json.loads(out.read_text())
        if _identity(result.get('job', {})) == _identity(job) and result.get('status') == 'ok':
            return dict(result, job=job)
    return None


def _child_env() -> dict:
    env = dict(os.environ)
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
        env[var] = '1'
    return env


def _failed(job: dict, status: str, wall: float, cpu: float) -> dict:
    nan = float('nan')
    return dict(job=job, status=status, mAP=nan, mAP50=nan, mAP75=nan, final_loss=nan,
                loss_curve=[], iters=0, lr=nan, train_s=nan, val_s=nan, wall_s=wall,
                cpu_s=cpu, load_end=_load())


def run_jobs(jobs: list[dict], workers: int, log=print, reuse: bool = False) -> list[dict]:
    """Run the jobs, ``workers`` child processes at a time (0: in this process, one after
    the other); with ``reuse``, a job whose finished result is in its work dir is not run
    again. Every result is also written to its work dir's result.json as it finishes.
    Returns the results in the jobs' order."""
    results: dict[int, dict] = {}
    order = list(range(len(jobs)))
    if reuse:
        for i in order:
            saved = saved_result(jobs[i])
            if saved is not None:
                results[i] = saved
                log(f'reusing {jobs[i]["work_dir"]}/result.json')
        order = [i for i in order if i not in results]
    start = time.perf_counter()

    def finish(i, result):
        results[i] = result
        Path(jobs[i]['work_dir']).mkdir(parents=True, exist_ok=True)
        (Path(jobs[i]['work_dir']) / 'result.json').write_text(
            json.dumps(result, default=float) + '\n')
        log(f'[{len(results)}/{len(jobs)} {time.perf_counter() - start:5.0f}s] '
            f'{jobs[i]["label"]:45s} seed {jobs[i]["seed"]}: mAP {result["mAP"]:.3f} '
            f'mAP50 {result["mAP50"]:.3f} loss {result["final_loss"]:.3f} '
            f'CPU {result["cpu_s"]:.0f}s wall {result["wall_s"]:.0f}s {result["status"]}')

    if workers <= 0:
        for i in order:
            finish(i, run_one(jobs[i]))
        return [results[i] for i in range(len(jobs))]
    pending, running = list(order), {}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            work = Path(jobs[i]['work_dir'])
            work.mkdir(parents=True, exist_ok=True)
            out = work / 'child_result.json'
            if out.exists():
                out.unlink()
            log_file = open(work / 'run.log', 'w')
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), '--run-job', json.dumps(jobs[i]),
                 '--result', str(out)], stdout=log_file, stderr=subprocess.STDOUT,
                env=_child_env(), cwd=str(REPO))
            running[i] = (proc, log_file, out, time.perf_counter())
        time.sleep(1.0)
        for i, (proc, log_file, out, t0) in list(running.items()):
            # wait4: the child's own CPU time from the kernel, whatever else runs
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            log_file.close()
            del running[i]
            cpu = usage.ru_utime + usage.ru_stime
            if out.is_file():
                result = json.loads(out.read_text())
                result['cpu_s'] = cpu  # the whole process (imports included)
            else:
                result = _failed(jobs[i], f'child exit {proc.returncode} (see {log_file.name})',
                                 time.perf_counter() - t0, cpu)
            finish(i, result)
    return [results[i] for i in range(len(jobs))]


# ----------------------------------------------------------------------------- report


def _stats(values):
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return float('nan'), float('nan'), 0
    return sum(vals) / len(vals), max(vals) - min(vals), len(vals)


def _f(x, digits=3):
    return f'{x:.{digits}f}' if isinstance(x, (int, float)) and math.isfinite(x) else 'fails'


def summarise(results: list[dict], rows: list[str]) -> list[dict]:
    """Per row: mean and spread (max - min over seeds) of mAP and mAP50, per-seed values,
    mean CPU and wall time."""
    out = []
    for row in rows:
        rs = sorted((r for r in results if r['job']['row'] == row),
                    key=lambda r: r['job']['seed'])
        if not rs:
            continue
        mAP, mAP_spread, n = _stats([r['mAP'] for r in rs])
        mAP50, mAP50_spread, _ = _stats([r['mAP50'] for r in rs])
        out.append(dict(row=row, label=ROWS[row]['label'], batch=rs[0]['job']['batch'],
                        lr=rs[0]['lr'], iters=rs[0]['iters'], seeds=len(rs), finished=n,
                        mAP=mAP, mAP_spread=mAP_spread, mAP50=mAP50, mAP50_spread=mAP50_spread,
                        final_loss=_stats([r['final_loss'] for r in rs])[0],
                        cpu_s=_stats([r['cpu_s'] for r in rs])[0],
                        wall_s=_stats([r['wall_s'] for r in rs])[0],
                        per_seed=[dict(seed=r['job']['seed'], mAP=r['mAP'], mAP50=r['mAP50'],
                                       cpu_s=r['cpu_s'], wall_s=r['wall_s'],
                                       status=r['status']) for r in rs]))
    return out


def summary_table(summary: list[dict]) -> str:
    head = ('row', 'images per step', 'steps', 'lr', 'mAP', 'per seed', 'spread', 'mAP50',
            'final loss', 'CPU per run', 'wall per run')
    rows = []
    for s in summary:
        failed = '' if s['finished'] == s['seeds'] else f' ({s["seeds"] - s["finished"]} failed)'
        per_seed = ', '.join(f'{_f(p["mAP"])} ({p["cpu_s"]:.0f} s)' for p in s['per_seed'])
        rows.append((s['label'], s['batch'], s['iters'], f'{s["lr"]:.4g}', _f(s['mAP']) + failed,
                     per_seed, _f(s['mAP_spread']), _f(s['mAP50']), _f(s['final_loss']),
                     f'{s["cpu_s"]:.0f} s', f'{s["wall_s"]:.0f} s'))
    return sbd.md_table(head, rows)


def pretrain_line(setting: dict, ckpts: dict[str, str]) -> str:
    parts = []
    for norm, path in sorted(ckpts.items()):
        if Path(path).is_file():
            meta = pretrain_backbone.read_meta(Path(path))
            parts.append(f'{norm.upper()} {meta["holdout_accuracy"]:.3f} held-out accuracy '
                         f'({meta["cpu_s"]:.0f} s CPU)')
    p = setting['pretrain']
    return (f'Pretrained backbones: {p["images"]} crops of {p["crop"]} px, batch {p["batch"]}, '
            f'lr {p["lr"]:g} cosine, digits of the detection train pool only: '
            + '; '.join(parts) + '.')


def render(run: dict) -> str:
    s = run['setting']
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
        f'80 % and 93 %; seeds {run["seeds"]}. ' + pretrain_line(s, run['checkpoints']),
        '',
        'mAP: COCO box AP on the val canvases (unseen digits), mean over seeds, then each '
        'seed\'s with its CPU time; spread: max - min over seeds; CPU per run: the child '
        'process\'s CPU time (one torch thread), mean over seeds.',
        '',
        summary_table(summarise(run['results'], run['rows'])),
        '',
        f'![mAP per row]({PLOT})',
        '',
    ])


def plot(run: dict, path: Path) -> None:
    st = run['setting']
    sbd.plot_rows(summarise(run['results'], run['rows']), run['results'],
                  f'Faster R-CNN from a pretrained backbone, digits {st["size"]} px, '
                  f'{st["images"]} images seen', path)


def probe_table(probes: list[dict]) -> str:
    """One line per setting and row: mAP (each seed's), and the gap to row i."""
    groups: dict[str, dict] = {}
    for p in probes:
        key = json.dumps(p['setting'], sort_keys=True)
        groups.setdefault(key, dict(setting=p['setting'], runs=[]))['runs'].append(p)
    lines = []
    for entry in groups.values():
        s, runs = entry['setting'], entry['runs']
        target = _stats([r['mAP'] for r in runs if r['row'] == 'i'])[0]
        for row in ROWS:
            rs = sorted((r for r in runs if r['row'] == row), key=lambda r: r['seed'])
            if not rs:
                continue
            mAP = _stats([r['mAP'] for r in rs])[0]
            lines.append((
                f'{s["images"]} img, lr {s["lr_per_image"]:g}/image, frozen stages '
                f'{s["frozen_stages"]}', ROWS[row]['label'], rs[0]['batch'], rs[0]['iters'],
                f'{rs[0]["lr"]:.4g}', _f(mAP), ', '.join(_f(r['mAP']) for r in rs),
                _f(_stats([r['mAP50'] for r in rs])[0]),
                f'{(mAP - target) * 100:+.1f}' if row != 'i' and math.isfinite(mAP)
                and math.isfinite(target) else '-',
                _f(_stats([r['final_loss'] for r in rs])[0]),
                ', '.join(f'{r["cpu_s"]:.0f} s' for r in rs),
                ', '.join(f'{r["wall_s"]:.0f} s' for r in rs),
                '; '.join(sorted({r['status'] for r in rs}))))
    return sbd.md_table(('setting', 'row', 'images per step', 'steps', 'lr', 'mAP', 'per seed',
                         'mAP50', 'vs i (mAP points)', 'final loss', 'CPU per run',
                         'wall per run', 'status'),
                        lines)


def render_probes(saved: dict) -> str:
    settings = {json.dumps(p['setting'], sort_keys=True): p['setting'] for p in saved['probes']}
    common = [f'- {setting_name(s)}; large batch {s["large"]}, small batch {s["small"]}'
              for s in settings.values()]
    return '\n'.join(['', f'Every baseline probe run so far (`{PROBES_JSON}`; mean over the '
                      'seeds run, then each seed; CPU per run: the child process\'s CPU time, '
                      'one torch thread). Settings:', '', *common, '',
                      probe_table(saved['probes']), ''])


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n', 1)[1])
    ap.add_argument('--probe', action='store_true',
                    help='baseline rows only (no CBN); appended to the probes json')
    ap.add_argument('--rows', nargs='+', choices=list(ROWS), default=list(ROWS))
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    ap.add_argument('--workers', type=int, default=1,
                    help='child processes at a time, one torch thread each; 0: in this process')
    ap.add_argument('--window', type=int, default=None,
                    help='CBN window_size of the CBN rows (default: the window CBNHook '
                    'derives, cbn_plugin.derived_window_size: 32 images)')
    ap.add_argument('--reuse', action='store_true',
                    help='keep the finished results already in the work dirs of identical jobs '
                    '(resume an interrupted study)')
    ap.add_argument('--only-finished', action='store_true',
                    help='with --reuse: run nothing, report the jobs that have a finished '
                    'result (rows may have different seeds) and name the others')
    ap.add_argument('--tiny', action='store_true',
                    help='a tiny data set, backbone and pretraining: the pipeline in seconds')
    ap.add_argument('--from-json', action='store_true',
                    help='no training: re-render the md and the plot from the jsons in --out-dir')
    ap.add_argument('--out-dir', type=Path, default=REPO / 'docs')
    ap.add_argument('--data-root', type=Path, default=REPO / 'data' / 'small_batch_det')
    ap.add_argument('--pretrained-root', type=Path, default=pretrain_backbone.DEFAULT_ROOT)
    ap.add_argument('--work-dir', type=Path, default=REPO / 'work_dirs' / 'pretrained_det')
    g = ap.add_argument_group('setting (the small-batch study\'s, see its --help)')
    for key, value in SETTING_DEFAULTS.items():
        flag = '--' + key.replace('_', '-')
        if key == 'digit_px':
            g.add_argument(flag, type=int, nargs=2, default=None)
        elif isinstance(value, list):
            g.add_argument(flag, type=int, nargs=2, default=value)
        else:
            g.add_argument(flag, type=type(value), default=value)
    p = ap.add_argument_group('pretraining recipe (pretrain_backbone.py; default: its own)')
    for key in PRETRAIN_OPTIONS:
        value = pretrain_backbone.RECIPE_DEFAULTS[key]
        flag = '--pretrain-' + key.replace('_', '-')
        if isinstance(value, list):
            p.add_argument(flag, type=int, nargs=2, default=None)
        else:
            p.add_argument(flag, type=type(value), default=None)
    ap.add_argument('--run-job', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--result', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:  # tiny defaults; options given on the command line still win
        tiny = dict(size=64, num_train=8, num_val=4, images=8, width=8, seeds=[0], large=4)
        tiny.update({'pretrain_' + k: v for k, v in pretrain_backbone.TINY_RECIPE.items()
                     if k != 'width'})
        ap.set_defaults(**tiny)
        args = ap.parse_args(argv)
    return args


def _meta(argv) -> dict:
    import platform
    import torch
    args = sys.argv[1:] if argv is None else list(argv)
    return dict(command=' '.join(['python', TOOL] + args), when=time.strftime('%Y-%m-%d %H:%M'),
                machine=f'{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}',
                load_start=_load())


def main(argv=None):
    args = parse_args(argv)
    if args.run_job:  # a child process: one run
        result = run_one(json.loads(args.run_job))
        Path(args.result).write_text(json.dumps(result, default=float) + '\n')
        return result
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = out_dir / DOC
    if args.from_json:
        probes_path, results_path = out_dir / PROBES_JSON, out_dir / RESULTS_JSON
        if probes_path.is_file():
            sbd.write_block(doc, PROBE_BEGIN, PROBE_END,
                            render_probes(json.loads(probes_path.read_text())), TITLE)
        if results_path.is_file():
            run = json.loads(results_path.read_text())
            plot(run, out_dir / PLOT)
            sbd.write_block(doc, DOC_BEGIN, DOC_END, render(run), TITLE)
        return None

    rows = args.rows
    if args.probe and not all(is_baseline(r) for r in rows):
        raise SystemExit(f'--probe runs baseline rows only (no CBN); got CBN rows '
                         f'{[r for r in rows if not is_baseline(r)]}')
    if args.window is not None and args.window < 1:
        raise SystemExit(f'--window {args.window}: a CBN window_size is an integer >= 1 '
                         '(1 is plain BN)')
    setting = setting_from_args(args)
    meta = _meta(argv)
    t0 = time.perf_counter()
    data_root = sbd.ensure_data(args.data_root, setting)
    ckpts = checkpoints(setting, sorted({PRETRAINED_OF[ROWS[r]['backbone']] for r in rows}),
                        args.pretrained_root, log=lambda s: print(s, flush=True))
    digest = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]
    group = 'probe' if args.probe else 'compare'
    jobs = [make_job(row, setting, seed, data_root, args.work_dir / digest, ckpts, group,
                     args.window)
            for seed in args.seeds for row in rows]
    if args.only_finished:
        if not args.reuse:
            raise SystemExit('--only-finished reports the finished runs of --reuse: add --reuse')
        finished = [saved_result(j) is not None for j in jobs]  # each result read once
        missing = [j for j, done in zip(jobs, finished) if not done]
        jobs = [j for j, done in zip(jobs, finished) if done]
        if not jobs:
            raise SystemExit('--only-finished: none of these runs has a finished result in '
                             f'{args.work_dir / digest}')
        if missing:
            print('not run (no finished result): '
                  + ', '.join(f'{j["row"]} seed {j["seed"]}' for j in missing), flush=True)
    print(f'{len(jobs)} runs, {args.workers} at a time; setting: {setting_name(setting)}',
          flush=True)
    results = run_jobs(jobs, args.workers, log=lambda s: print(s, flush=True), reuse=args.reuse)
    if args.probe:
        path = out_dir / PROBES_JSON
        saved = json.loads(path.read_text()) if path.is_file() else dict(probes=[])
        fresh = [dict(setting=setting, row=r['job']['row'], batch=r['job']['batch'],
                      seed=r['job']['seed'], mAP=r['mAP'], mAP50=r['mAP50'], mAP75=r['mAP75'],
                      final_loss=r['final_loss'], iters=r['iters'], lr=r['lr'],
                      train_s=r['train_s'], val_s=r['val_s'], wall_s=r['wall_s'],
                      cpu_s=r['cpu_s'], status=r['status'],
                      pretrained_loaded=r.get('pretrained_loaded'), loss_curve=r['loss_curve'],
                      checkpoint=r['job']['backbone']['checkpoint'], workers=args.workers,
                      **meta, load_end=r.get('load_end', _load())) for r in results]
        keys = {(json.dumps(e['setting'], sort_keys=True), e['row'], e['seed']) for e in fresh}
        saved['probes'] = [e for e in saved['probes'] if (json.dumps(
            e['setting'], sort_keys=True), e['row'], e['seed']) not in keys] + fresh
        path.write_text(json.dumps(saved, indent=1, default=float) + '\n')
        sbd.write_block(doc, PROBE_BEGIN, PROBE_END, render_probes(saved), TITLE)
        print(probe_table([e for e in saved['probes'] if e['setting'] == setting]))
        return saved
    run = dict(meta, setting=setting, rows=rows, seeds=args.seeds, workers=args.workers,
               checkpoints=ckpts, wall_s=time.perf_counter() - t0, load_end=_load(),
               results=results)
    (out_dir / RESULTS_JSON).write_text(json.dumps(run, indent=1, default=float) + '\n')
    plot(run, out_dir / PLOT)
    sbd.write_block(doc, DOC_BEGIN, DOC_END, render(run), TITLE)
    print(summary_table(summarise(results, rows)))
    bad = [r['job']['label'] for r in results if r['status'] != 'ok']
    if bad:
        print(f'runs that did not finish: {bad}', flush=True)
    return run


if __name__ == '__main__':
    main()
