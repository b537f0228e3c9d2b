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

Five modes, one json each, rendered into ``docs/small_batch_detection.md``:

    # BN-only probes (finding the setting): BN at the large batch and the small ones
    .venv/bin/python tools/analysis_tools/small_batch_detection.py --probe \\
        --batches 8 2 1 --size 128 --width 32 --images 4000
    # the comparison in the chosen setting (rows x seeds, --workers processes)
    .venv/bin/python tools/analysis_tools/small_batch_detection.py
    # the converged comparison: its rows at several budgets (images seen), each with its
    # own schedule, at equal images and against compute; resumable with --reuse
    .venv/bin/python tools/analysis_tools/small_batch_detection.py --converged \\
        --images 6000 2400 15000 --workers 1 --reuse
    # the CPU per training image of each row, side by side in one process (minutes)
    .venv/bin/python tools/analysis_tools/small_batch_detection.py --step-cost
    # a few seconds: the whole pipeline on a tiny data set, into --out-dir
    .venv/bin/python tools/analysis_tools/small_batch_detection.py --tiny --out-dir /tmp/sbd
    # re-render the md and the plots from the jsons, no training (--converged: its block only)
    .venv/bin/python tools/analysis_tools/small_batch_detection.py --from-json

Probes are appended to ``docs/small_batch_detection_probes.json`` (a rerun of the same
setting, batch and seed replaces its entry); the comparison writes
``docs/small_batch_detection.json`` and ``docs/small_batch_detection.png``; the converged
comparison ``docs/small_batch_detection_converged.json`` (after every run: what ran so far
and the plan) and ``..._converged.png``. Each run is a child process with one torch thread
(``--workers 0``: in this process, one after the other); its wall time (process start to
val metrics) and CPU time are recorded.

The code is the package next to this file, ``small_batch_det/``, one concept a module
(rows and setting, data, configs, jobs, goals, report, plots, probes, converged), on the
runner the detection studies share (``detection_runner.py``: running jobs, the options, the
report header); the names other tools and the tests use are re-exported here.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The study's public names, importable from this tool as before the split (other studies
# build on make_job, run_jobs, distinct_rows, training_of, the rows and the settings).
from small_batch_det import (  # noqa: E402,F401
    BUDGETS, CONFIG, CONVERGED_BEGIN, CONVERGED_END, CONVERGED_JSON, CONVERGED_PLOT,
    CONVERGED_ROWS, DEFAULT_ROWS, FIRST_ROWS, DOC, DOC_BEGIN, DOC_END, GN_GROUPS, PLOT, PROBE_BEGIN,
    PROBE_END, PROBES_JSON, RESULTS_JSON, ROWS, SETTING_DEFAULTS, TITLE, build_config,
    compute_table, cpu_to_reach, curves, distinct_rows, ensure_data, fmt, goals, load_average,
    loss_curve, make_job, make_recorder, norm_cfg, plan, plot, plot_converged, plot_rows,
    probe_table, render, render_converged, render_probes, run_converged, run_jobs, run_one,
    run_probes, setting_from_args, setting_name, stats, summarise, summary_table, training_of,
    STEP_COST_BEGIN, STEP_COST_END, STEP_COST_JSON, STEP_COST_ROWS, render_step_cost,
    run_step_cost, step_cost_of)
from detection_runner import (  # noqa: E402,F401
    TINY, add_study_args, parse_study_args, publish, recorded_results, rerender, run_child,
    study_parser)
from detection_runner import meta as study_meta  # noqa: E402
from study_markdown import md_table, write_block  # noqa: E402,F401

TOOL = 'tools/analysis_tools/small_batch_detection.py'


def parse_args(argv=None):
    ap = study_parser(__doc__)
    ap.add_argument('--probe', action='store_true',
                    help='BN-only probes at --batches; appended to the probes json')
    ap.add_argument('--batches', type=int, nargs='+', default=[8, 2, 1],
                    help='--probe: the BN batches (drops are measured against --large\'s)')
    ap.add_argument('--converged', action='store_true',
                    help='the converged comparison: --rows (default: '
                    f'{" ".join(CONVERGED_ROWS)}) at every budget of --images (default: '
                    f'{" ".join(map(str, BUDGETS))}), each its own schedule, into its own json; '
                    'runs the --first rows at every budget first, then the others, each budget '
                    'by budget as given, then seed, then row')
    ap.add_argument('--first', nargs='*', choices=list(ROWS), default=FIRST_ROWS,
                    help='--converged: these rows\' runs start first, at every budget '
                    f'(default: {" ".join(FIRST_ROWS)}; none: budget by budget)')
    ap.add_argument('--step-cost', action='store_true',
                    help='the CPU per training step and image of --rows (default: '
                    f'{" ".join(STEP_COST_ROWS)}), side by side in this process; no training '
                    'to the end, no val')
    ap.add_argument('--step-repeats', type=int, default=5,
                    help='--step-cost: rounds, the rows taking turns in each (median kept)')
    ap.add_argument('--step-steps', type=int, default=10,
                    help='--step-cost: timed steps per row per round')
    ap.add_argument('--rows', nargs='+', choices=list(ROWS), default=None,
                    help=f'default: {" ".join(DEFAULT_ROWS)} (--converged: its rows)')
    add_study_args(ap, SETTING_DEFAULTS, work_dir=REPO / 'work_dirs' / 'small_batch_det',
                   workers=2, several=('images',))
    args = parse_study_args(ap, argv, tiny=dict(batches=[4, 2], images=[TINY['images']]))
    if args.converged and args.step_cost:
        ap.error('--converged and --step-cost are separate modes')
    if args.converged:
        args.budgets = args.images or list(BUDGETS)
        args.rows = args.rows or list(CONVERGED_ROWS)
    elif args.step_cost:
        args.budgets = args.images or [SETTING_DEFAULTS['images']]
        args.rows = args.rows or list(STEP_COST_ROWS)
    elif args.images and len(args.images) > 1:
        ap.error('several --images are the budgets of --converged; other modes take one')
    else:
        args.budgets = args.images or [SETTING_DEFAULTS['images']]
        args.rows = args.rows or list(DEFAULT_ROWS)
    args.images = args.budgets[0]  # the setting's; --converged gives each budget its own
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.run_job:  # a child process: one run
        return run_child(args, run_one)
    out_dir = args.out_dir  # parse_study_args made it
    if args.from_json:  # every json there (probes, comparison, converged); --converged: its own
        converged = (CONVERGED_JSON, CONVERGED_BEGIN, CONVERGED_END,
                     lambda run: render_converged(run, step_cost_of(out_dir)),
                     lambda run, out: plot_converged(run, out / CONVERGED_PLOT))
        rerender(out_dir, DOC, TITLE, [converged] if args.converged else [
            (PROBES_JSON, PROBE_BEGIN, PROBE_END, render_probes, None),
            (RESULTS_JSON, DOC_BEGIN, DOC_END, render, lambda run, out: plot(run, out / PLOT)),
            converged, (STEP_COST_JSON, STEP_COST_BEGIN, STEP_COST_END, render_step_cost, None)])
        return None

    setting = setting_from_args(args)
    meta = study_meta(TOOL, argv)
    t0 = time.perf_counter()
    data_root = ensure_data(args.data_root, setting)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.probe:
        return run_probes(setting, args.batches, args.seeds, data_root, args.work_dir, out_dir,
                          args.workers, args.reuse, meta)
    if args.step_cost:
        return run_step_cost(setting, args.rows, data_root, out_dir, meta, args.step_repeats,
                             args.step_steps, log=log)
    if args.converged:
        return run_converged(setting, args.budgets, args.rows, args.seeds, data_root,
                             args.work_dir, out_dir, args.workers, args.reuse, args.window,
                             meta, log=log, first=args.first)

    rows, repeats = distinct_rows(args.rows, setting, args.window)
    for row, same in repeats.items():
        log(f'row {row!r} trains the same runs as {same!r} in this setting: run once')
    jobs = [make_job(row, setting, seed, data_root, args.work_dir / 'compare',
                     window=args.window)
            for seed in args.seeds for row in rows]
    log(f'{len(jobs)} runs, {args.workers} at a time; setting: {setting_name(setting)}')
    # --reuse also takes identical jobs from the json this run rewrites (the committed
    # comparison: its rows need no work dirs to be kept).
    recorded = recorded_results([out_dir / RESULTS_JSON]) if args.reuse else []
    results = run_jobs(jobs, args.workers, log=log, reuse=args.reuse, recorded=recorded)
    run = dict(meta, setting=setting, rows=rows, seeds=args.seeds, workers=args.workers,
               wall_s=time.perf_counter() - t0, load_end=load_average(), results=results)
    publish(run, out_dir, RESULTS_JSON, plot, PLOT, DOC, DOC_BEGIN, DOC_END, render(run), TITLE,
            summary_table(summarise(results, rows)))
    return run


if __name__ == '__main__':
    main()
