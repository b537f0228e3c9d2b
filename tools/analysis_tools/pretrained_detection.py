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

import hashlib
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tools'))
sys.path.insert(0, str(REPO / 'tools' / 'analysis_tools'))

import detection_runner  # noqa: E402
import pretrain_backbone  # noqa: E402
import small_batch_detection as sbd  # noqa: E402
from detection_runner import (  # noqa: E402
    add_study_args, by_setting, header, load_average, merge_probes, parse_study_args, publish,
    rerender, run_child, saved_result, study_parser)
from detection_runner import meta as study_meta  # noqa: E402
from small_batch_det import fmt, stats  # noqa: E402
from small_batch_det.report import mean_mAP  # noqa: E402
from study_markdown import md_table, write_block  # noqa: E402
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


def run_one(job: dict, started: float | None = None) -> dict:
    """Train and validate one job in this process (one torch thread); return its result,
    with whether the backbone held the checkpoint's weights when training began."""
    load_check = make_load_check(job['backbone']['checkpoint'])
    result = detection_runner.run_one(job, build_config, started,
                                      hooks=[(load_check, 'VERY_HIGH')])
    return dict(result, pretrained_loaded=load_check.loaded)


# ----------------------------------------------------------------------------- jobs


def run_jobs(jobs: list[dict], workers: int, log=print, reuse: bool = False) -> list[dict]:
    """Run the jobs as given, ``workers`` child processes of this tool at a time (0: in this
    process, one after the other); with ``reuse``, a job whose finished result is in its
    work dir is not run again (``detection_runner.run_jobs``). Returns the results in the
    jobs' order."""
    # run_one looked up here at call time: a test may replace it
    return detection_runner.run_jobs(jobs, workers, command=Path(__file__).resolve(),
                                     in_process=lambda job: run_one(job), log=log, reuse=reuse)


# ----------------------------------------------------------------------------- report


def summary_table(summary: list[dict]) -> str:
    head = ('row', 'images per step', 'steps', 'lr', 'mAP', 'per seed', 'spread', 'mAP50',
            'final loss', 'CPU per run', 'wall per run')
    rows = []
    for s in summary:
        per_seed = ', '.join(f'{fmt(p["mAP"])} ({p["cpu_s"]:.0f} s)' for p in s['per_seed'])
        rows.append((s['label'], s['batch'], s['iters'], f'{s["lr"]:.4g}', mean_mAP(s),
                     per_seed, fmt(s['mAP_spread']), fmt(s['mAP50']), fmt(s['final_loss']),
                     f'{s["cpu_s"]:.0f} s', f'{s["wall_s"]:.0f} s'))
    return md_table(head, rows)


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
        *header(run, setting_name(s), pretrain_line(s, run['checkpoints'])),
        '',
        'mAP: COCO box AP on the val canvases (unseen digits), mean over seeds, then each '
        'seed\'s with its CPU time; spread: max - min over seeds; CPU per run: the child '
        'process\'s CPU time (one torch thread), mean over seeds.',
        '',
        summary_table(sbd.summarise(run['results'], run['rows'])),
        '',
        f'![mAP per row]({PLOT})',
        '',
    ])


def plot(run: dict, path: Path) -> None:
    st = run['setting']
    sbd.plot_rows(sbd.summarise(run['results'], run['rows']), run['results'],
                  f'Faster R-CNN from a pretrained backbone, digits {st["size"]} px, '
                  f'{st["images"]} images seen', path)


def probe_table(probes: list[dict]) -> str:
    """One line per setting and row: mAP (each seed's), and the gap to row i."""
    lines = []
    for s, runs in by_setting(probes):
        target = stats([r['mAP'] for r in runs if r['row'] == 'i'])[0]
        for row in ROWS:
            rs = sorted((r for r in runs if r['row'] == row), key=lambda r: r['seed'])
            if not rs:
                continue
            mAP = stats([r['mAP'] for r in rs])[0]
            lines.append((
                f'{s["images"]} img, lr {s["lr_per_image"]:g}/image, frozen stages '
                f'{s["frozen_stages"]}', ROWS[row]['label'], rs[0]['batch'], rs[0]['iters'],
                f'{rs[0]["lr"]:.4g}', fmt(mAP), ', '.join(fmt(r['mAP']) for r in rs),
                fmt(stats([r['mAP50'] for r in rs])[0]),
                f'{(mAP - target) * 100:+.1f}' if row != 'i' and math.isfinite(mAP)
                and math.isfinite(target) else '-',
                fmt(stats([r['final_loss'] for r in rs])[0]),
                ', '.join(f'{r["cpu_s"]:.0f} s' for r in rs),
                ', '.join(f'{r["wall_s"]:.0f} s' for r in rs),
                '; '.join(sorted({r['status'] for r in rs}))))
    return md_table(('setting', 'row', 'images per step', 'steps', 'lr', 'mAP', 'per seed',
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
    ap = study_parser(__doc__)
    ap.add_argument('--probe', action='store_true',
                    help='baseline rows only (no CBN); appended to the probes json')
    ap.add_argument('--rows', nargs='+', choices=list(ROWS), default=list(ROWS))
    ap.add_argument('--only-finished', action='store_true',
                    help='with --reuse: run nothing, report the jobs that have a finished '
                    'result (rows may have different seeds) and name the others')
    ap.add_argument('--pretrained-root', type=Path, default=pretrain_backbone.DEFAULT_ROOT)
    add_study_args(ap, SETTING_DEFAULTS, work_dir=REPO / 'work_dirs' / 'pretrained_det',
                   workers=1)
    p = ap.add_argument_group('pretraining recipe (pretrain_backbone.py; default: its own)')
    for key in PRETRAIN_OPTIONS:
        value = pretrain_backbone.RECIPE_DEFAULTS[key]
        flag = '--pretrain-' + key.replace('_', '-')
        if isinstance(value, list):
            p.add_argument(flag, type=int, nargs=2, default=None)
        else:
            p.add_argument(flag, type=type(value), default=None)
    # --tiny: a tiny backbone pretraining too
    return parse_study_args(ap, argv, tiny={'pretrain_' + k: v for k, v in
                                            pretrain_backbone.TINY_RECIPE.items() if k != 'width'})


def main(argv=None):
    args = parse_args(argv)
    if args.run_job:  # a child process: one run
        return run_child(args, run_one)
    out_dir = args.out_dir  # parse_study_args made it
    if args.from_json:
        rerender(out_dir, DOC, TITLE, [
            (PROBES_JSON, PROBE_BEGIN, PROBE_END, render_probes, None),
            (RESULTS_JSON, DOC_BEGIN, DOC_END, render, lambda run, out: plot(run, out / PLOT))])
        return None

    rows = args.rows
    if args.probe and not all(is_baseline(r) for r in rows):
        raise SystemExit(f'--probe runs baseline rows only (no CBN); got CBN rows '
                         f'{[r for r in rows if not is_baseline(r)]}')
    setting = setting_from_args(args)
    meta = study_meta(TOOL, argv)
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
        fresh = [dict(setting=setting, row=r['job']['row'], batch=r['job']['batch'],
                      seed=r['job']['seed'], mAP=r['mAP'], mAP50=r['mAP50'], mAP75=r['mAP75'],
                      final_loss=r['final_loss'], iters=r['iters'], lr=r['lr'],
                      train_s=r['train_s'], val_s=r['val_s'], wall_s=r['wall_s'],
                      cpu_s=r['cpu_s'], status=r['status'],
                      pretrained_loaded=r.get('pretrained_loaded'), loss_curve=r['loss_curve'],
                      checkpoint=r['job']['backbone']['checkpoint'], workers=args.workers,
                      **meta, load_end=r.get('load_end', load_average())) for r in results]
        saved = merge_probes(out_dir / PROBES_JSON, fresh, ('row', 'seed'))
        write_block(out_dir / DOC, PROBE_BEGIN, PROBE_END, render_probes(saved), TITLE)
        print(probe_table([e for e in saved['probes'] if e['setting'] == setting]))
        return saved
    run = dict(meta, setting=setting, rows=rows, seeds=args.seeds, workers=args.workers,
               checkpoints=ckpts, wall_s=time.perf_counter() - t0, load_end=load_average(),
               results=results)
    publish(run, out_dir, RESULTS_JSON, plot, PLOT, DOC, DOC_BEGIN, DOC_END, render(run), TITLE,
            summary_table(sbd.summarise(results, rows)))
    return run


if __name__ == '__main__':
    main()
