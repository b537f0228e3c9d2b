"""Small-batch detection study: BN, GN and CBN in every norm layer of a Faster R-CNN.

The demo's digits detector (``configs/demo/_base_faster-rcnn_r18-w32_fpn_digits.py``,
data from ``tools/make_digits_det.py``) trained from scratch with the studied norm in
*every* norm layer: the ResNet stem and stages (downsample shortcuts included), the FPN
and the box-head convs (``configs/small_batch_det/``). Every run sees the same number of
training images; the learning rate is scaled linearly with the images per optimizer step
(Goyal et al.), and warm-up, learning-rate steps and CBN burn-in are fixed fractions of
the images seen. CBN's rows give no window_size, as the README tells users: CBNHook
derives ``k = max(2, round(32 / images per step))`` (``--window K`` fixes it instead, for
the window sweep).

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

The code is the package next to this file, ``small_batch_det/``, one concept a module
(rows and setting, data, configs, jobs, goals, report, plots, probes); the names other
tools and the tests use are re-exported here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The study's public names, importable from this tool as before the split (other studies
# build on make_job, run_jobs, distinct_rows, training_of, the rows and the settings).
from small_batch_det import (  # noqa: E402,F401
    CONFIG, DEFAULT_ROWS, DOC, DOC_BEGIN, DOC_END, GN_GROUPS, PLOT, PROBE_BEGIN, PROBE_END,
    PROBES_JSON, RESULTS_JSON, ROWS, SETTING_DEFAULTS, TITLE, build_config, distinct_rows,
    ensure_data, goals, load_average, loss_curve, make_job, make_recorder, norm_cfg, plot,
    plot_rows, probe_table, render, render_probes, run_jobs, run_one, run_probes,
    setting_from_args, setting_name, stats, summarise, summary_table, training_of)
from study_markdown import md_table, write_block  # noqa: E402,F401

TOOL = 'tools/analysis_tools/small_batch_detection.py'


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
    ap.add_argument('--window', type=int, default=None,
                    help='every CBN row without a fixed window pools this many steps '
                         '(default: the window CBNHook derives, 32 images)')
    ap.add_argument('--workers', type=int, default=2,
                    help='child processes at a time, one torch thread each; 0: in this process')
    ap.add_argument('--reuse', action='store_true',
                    help='keep the finished results of identical jobs, from their work dirs '
                    'or from the results json in --out-dir (resume an interrupted study; '
                    'rerun only the rows a change touches)')
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


def _meta(argv) -> dict:
    import torch
    args = sys.argv[1:] if argv is None else list(argv)
    return dict(command=' '.join(['python', TOOL] + args), when=time.strftime('%Y-%m-%d %H:%M'),
                machine=f'{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}',
                load_start=load_average())


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
    if args.from_json:
        probes_path, results_path = out_dir / PROBES_JSON, out_dir / RESULTS_JSON
        if probes_path.is_file():
            write_block(doc, PROBE_BEGIN, PROBE_END,
                        render_probes(json.loads(probes_path.read_text())), TITLE)
        if results_path.is_file():
            run = json.loads(results_path.read_text())
            plot(run, out_dir / PLOT)
            write_block(doc, DOC_BEGIN, DOC_END, render(run), TITLE)
        return None

    setting = setting_from_args(args)
    meta = _meta(argv)
    t0 = time.perf_counter()
    data_root = ensure_data(args.data_root, setting)
    if args.probe:
        return run_probes(setting, args.batches, args.seeds, data_root, args.work_dir, out_dir,
                          args.workers, args.reuse, meta)

    if args.window is not None and args.window < 1:
        raise SystemExit(f'--window {args.window}: a window holds at least 1 step')
    rows, repeats = distinct_rows(args.rows, setting, args.window)
    for row, same in repeats.items():
        print(f'row {row!r} trains the same runs as {same!r} in this setting: run once',
              flush=True)
    jobs = [make_job(row, setting, seed, data_root, args.work_dir / 'compare',
                     window=args.window)
            for seed in args.seeds for row in rows]
    print(f'{len(jobs)} runs, {args.workers} at a time; setting: {setting_name(setting)}',
          flush=True)
    # --reuse also takes identical jobs from the json this run rewrites (the committed
    # comparison: its rows need no work dirs to be kept).
    recorded, path = None, (out_dir / RESULTS_JSON).resolve()
    if args.reuse and path.is_file():
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        recorded = (shown, json.loads(path.read_text())['results'])
    results = run_jobs(jobs, args.workers, log=lambda s: print(s, flush=True),
                       reuse=args.reuse, recorded=recorded)
    run = dict(meta, setting=setting, rows=rows, seeds=args.seeds, workers=args.workers,
               wall_s=time.perf_counter() - t0, load_end=load_average(), results=results)
    (out_dir / RESULTS_JSON).write_text(json.dumps(run, indent=1, default=float) + '\n')
    plot(run, out_dir / PLOT)
    write_block(doc, DOC_BEGIN, DOC_END, render(run), TITLE)
    print(summary_table(summarise(results, rows)))
    bad = [r['job']['label'] for r in results if r['status'] != 'ok']
    if bad:
        print(f'runs that did not finish: {bad}', flush=True)
    return run


if __name__ == '__main__':
    main()
