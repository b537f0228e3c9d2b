"""Small-batch study: BN, GN, naive CBN and CBN trained from scratch at batch 32 down to 1.

Every norm layer of a small CNN (and of a small ResNet, stem included) is swapped for the
norm under test; each run sees the same number of training samples, with the learning rate
scaled linearly with the batch (Goyal et al.) so that the schedule per sample is the same.
CBN's window is ``k = 32 / batch`` steps, so the window always spans 32 samples, the largest
batch. CBN runs use the layer's own options, each backward (``stats_backward`` 'current',
'pooled', 'compensated') with each compensation ('mu_nu', 'var'); the running statistics of
both sources ('batch', 'window') are kept side by side, so one trained network is evaluated
both ways. A row whose options are the layer's defaults is built as ``CBN(c, window_size=k)``
and nothing else, and the row ``CBN() (k=4)`` as ``CBN(c)``: the layer users get.

Alongside the accuracy, the script measures *why*: at chosen steps it pushes the raw input
batches of the window's old steps through the current whole network (every norm frozen to
the statistics it used at this step, so the function is exactly the one that ran) and
compares, per layer, the current batch alone, naive pooling and both compensations against
the true window statistics. It also compares the conv-weight gradient of each of the layer's
backwards (computed by the layer itself, on a copy of the network loaded from the
state_dict with ``stats_backward`` set) and of BN at the batch alone with large-batch BN's.

    .venv/bin/python tools/analysis_tools/small_batch_study.py   # full study -> docs/small_batch*
    .venv/bin/python tools/analysis_tools/small_batch_study.py --tiny --out-dir /tmp/sb  # seconds
    .venv/bin/python tools/analysis_tools/small_batch_study.py \
        --from-json docs/small_batch.json                          # re-render

The full run writes ``docs/small_batch.json`` (every run, every measurement),
``docs/small_batch.png`` (accuracy vs batch), ``docs/small_batch_errors.png`` (statistics
error vs window and learning rate) and the generated block of ``docs/small_batch.md``.

The code is the package next to this file, one concept a module: ``small_batch/data.py`` (the
digits tasks), ``models.py`` (the networks, the norm a row swaps in), ``probe.py`` (the
statistics-error and gradient analysis), ``grid.py`` (the rows and the runs), ``runner.py``
(training a run; worker processes and the resumable cache), ``report.py`` (tables and the
generated markdown) and ``plots.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from small_batch.grid import (  # noqa: E402
    DEFAULT, NORMS, PAPER, PLAIN, build_grid, build_precise_grid, cbn_label)
from small_batch.models import ARCHS  # noqa: E402
from small_batch.plots import plot_accuracy, plot_errors  # noqa: E402
from small_batch.report import (  # noqa: E402
    DOC_BEGIN, DOC_END, PRECISE_BEGIN, PRECISE_END, render, render_precise)
from small_batch.runner import _key, run_jobs  # noqa: E402
from study_markdown import write_block  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out-dir', type=Path, default=REPO / 'docs')
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--tiny', action='store_true',
                    help='1 seed, 2 batch sizes, a few steps: checks the pipeline in seconds')
    ap.add_argument('--cache', type=Path, default=None,
                    help='json-lines file of finished runs: appended to, and reused (resume)')
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--samples', type=int, default=4096)
    ap.add_argument('--base-lr', type=float, default=0.1, help='lr at batch 32')
    ap.add_argument('--batches', type=int, nargs='+', default=[32, 8, 4, 2, 1])
    ap.add_argument('--norms', nargs='+', default=list(NORMS), choices=list(NORMS))
    ap.add_argument('--seed-norms', nargs='+', choices=list(NORMS), default=[
        'BN', 'GN', PAPER, cbn_label('compensated', 'mu_nu'), DEFAULT, PLAIN],
                    help='main-grid rows trained with every seed; the others with seed 0 only')
    ap.add_argument('--raw-batches', type=int, nargs='+', default=[32, 2, 1])
    ap.add_argument('--resnet-batches', type=int, nargs='+', default=[32, 2])
    ap.add_argument('--resnet-norms', nargs='+', choices=list(NORMS), default=[
        'BN', 'GN', PAPER, DEFAULT, PLAIN])
    ap.add_argument('--resnet-seeds', type=int, default=1)
    ap.add_argument('--second-task', default='shift5', choices=['raw', 'lowres', 'shift5'])
    ap.add_argument('--second-arch', default='resnet', choices=list(ARCHS))
    ap.add_argument('--second-batches', type=int, nargs='+', default=[32, 2, 1])
    ap.add_argument('--second-norms', nargs='+', choices=list(NORMS),
                    default=['BN', 'GN', PAPER, DEFAULT, PLAIN])
    ap.add_argument('--second-seeds', type=int, default=2)
    ap.add_argument('--sweep-base-lrs', type=float, nargs='+', default=[0.1, 0.32, 0.8, 1.6],
                    help='lr at batch 32 (linear scaling below); 0.1 is the main grid\'s')
    ap.add_argument('--lr-batches', type=int, nargs='+', default=[32, 2, 1])
    ap.add_argument('--lr-norms', nargs='+', choices=list(NORMS),
                    default=['BN', 'GN', PAPER, DEFAULT, PLAIN])
    ap.add_argument('--lr-paper-batches', type=int, nargs='+', default=[2],
                    help='batches of the learning-rate sweep that also train the paper\'s layer')
    ap.add_argument('--top-lr-seeds', type=int, default=3,
                    help='seeds at the largest base lr for BN at 32 and 2, GN and the defaults '
                    'at batch 2 (the rest of the sweep: seed 0)')
    ap.add_argument('--sweep-batch', type=int, default=2)
    ap.add_argument('--sweep-windows', type=int, nargs='+', default=[4, 16])
    ap.add_argument('--sweep-norms', nargs='+', choices=list(NORMS), default=[PAPER])
    ap.add_argument('--trains', type=float, default=0.5,
                    help='BN at batch 32 "trains" at an lr when its test accuracy is at least this')
    ap.add_argument('--from-json', type=Path, default=None,
                    help='re-render the md and plots from an earlier run\'s json (no training)')
    ap.add_argument('--precise', action='store_true',
                    help='only the inference-statistics comparison: running statistics from '
                         'the batches, from the window, and recomputed after training '
                         '(PreciseBN/PreciseCBN); writes small_batch_precise.md/json')
    ap.add_argument('--precise-batches', type=int, nargs='+', default=[32, 2, 1])
    ap.add_argument('--precise-norms', nargs='+', choices=list(NORMS), default=['BN', DEFAULT])
    ap.add_argument('--precise-samples', type=int, default=1024,
                    help='training images the recomputed statistics see')
    ap.add_argument('--measure', type=int, default=6, help='analysis points per CBN run')
    ap.add_argument('--measure-bn', type=int, default=4,
                    help='gradient-direction points per non-CBN run')
    args = ap.parse_args(argv)
    if args.tiny:
        args.seeds, args.samples, args.batches = 1, 48, [8, 2]
        args.raw_batches, args.resnet_batches, args.resnet_seeds = [8], [2], 1
        args.resnet_norms = ['BN', PAPER, DEFAULT]
        args.second_batches, args.second_seeds = [8, 2], 1
        args.sweep_windows, args.sweep_base_lrs = [2, 4], [0.1, 0.8]
        args.lr_batches, args.lr_paper_batches = [32, 2], [2]
        args.sweep_norms = [PAPER, DEFAULT]
        args.lr_norms = ['BN', 'GN', PAPER, DEFAULT]
        args.measure, args.measure_bn, args.top_lr_seeds = 3, 2, 2
        args.precise_batches, args.precise_samples = [32, 2], 64
    return args


def precise_main(args, meta) -> list:
    jobs = build_precise_grid(args)
    print(f'{len(jobs)} runs, {args.workers} workers', flush=True)
    results, wall = run_jobs(jobs, args.workers, log=lambda s: print(s, flush=True),
                             cache=args.cache)
    meta['load_end'] = ' '.join(f'{v:.1f}' for v in os.getloadavg())
    (args.out_dir / 'small_batch_precise.json').write_text(json.dumps(
        dict(meta=meta, wall_s=wall, runs=results), indent=1, default=float) + '\n')
    block = render_precise(results, args, wall, meta)
    write_block(args.out_dir / 'small_batch_precise.md', PRECISE_BEGIN, PRECISE_END, block,
                'Recomputed inference statistics at small batch',
                'Whether statistics recomputed after training (PreciseBN for BN; every '
                'CBN layer pooling its window of k batches, as training normalised with) '
                'beat the running averages the layers keep. Everything between the '
                'markers is written by the command it names.\n')
    print(block)
    return results


def main(argv=None):
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    load = lambda: ' '.join(f'{v:.1f}' for v in os.getloadavg())  # noqa: E731
    meta = dict(command='python tools/analysis_tools/small_batch_study.py ' + ' '.join(
        sys.argv[1:] if argv is None else argv),
        when=time.strftime('%Y-%m-%d %H:%M'), load_start=load(),
        machine=f'{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}')
    if args.precise:
        return precise_main(args, meta)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        meta, wall, results = saved['meta'], saved['wall_s'], saved['runs']
        for k, v in saved['args'].items():
            if k not in ('out_dir', 'from_json', 'cache'):
                setattr(args, k, v)
    else:
        jobs = build_grid(args)
        print(f'{len(jobs)} runs ({len({_key(j) for j in jobs})} distinct), '
              f'{args.workers} workers', flush=True)
        results, wall = run_jobs(jobs, args.workers, log=lambda s: print(s, flush=True),
                                 cache=args.cache)
        meta['load_end'] = load()
        (args.out_dir / 'small_batch.json').write_text(json.dumps(
            dict(meta=meta, args={k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(args).items()},
                 wall_s=wall, runs=results), indent=1, default=float) + '\n')
    block = render(results, args, wall, meta)
    plot_accuracy(results, args, args.out_dir / 'small_batch.png')
    plot_errors(results, args, args.out_dir / 'small_batch_errors.png')
    write_block(args.out_dir / 'small_batch.md', DOC_BEGIN, DOC_END, block, 'Small-batch study')
    print(block)
    print(f'wall time {wall:.0f}s', flush=True)
    return results


if __name__ == '__main__':
    main()
