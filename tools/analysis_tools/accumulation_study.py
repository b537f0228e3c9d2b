"""Gradient accumulation with BN and CBN: does 1 image x A micro-batches train like A images?

The classification study's second setting (``small_batch_study.py``: the SmallResNet with all 9
norms swapped, on shifted 5x5 digits), trained with gradient accumulation: each optimizer step
sees ``A`` micro-batches of one image (each its own forward and backward, loss / A), then one
``opt.step()`` and one ``cbn_plugin.step``. Every row sees the same images in the same order
and uses the learning rate the study's rule gives for the step's images (linear scaling:
base lr x images per step / 32). Rows, for each A:

- BN at A images per step, no accumulation: the target;
- BN 1 x A accumulated (each micro-batch normalised on its own: what BN users get);
- CBN defaults 1 x A with ``accumulation='merge'`` (each micro-batch pooled with the step's
  earlier micro-batches and the past steps) and ``accumulation='own'`` (its own image and the
  past steps' full records only); window k = 32 / (images per step), the README's rule;
- rho 0 and 0.5 under 'merge';
- the two-pass step, ``accumulation='two_pass'``: a statistics pass (no gradient) over the
  step's micro-batches first, so that in the training pass every micro-batch is normalised
  with the whole step's statistics pooled with the window (the upper bound of what
  statistics alone can do, for one extra forward per micro-batch);
- rho 0 under 'two_pass' (the exact gradient through the other micro-batches, which
  'merge' gives rho 0 only through their share: is the rho 0 collapse the gradient's?);
- BN over the step's micro-batches, ``CBN(c, window_size=1, accumulation='two_pass')``: no
  window, no compensation, every micro-batch normalised with the whole step's statistics
  (BN statistics pooled across micro-batches);
- CBN defaults at A images per step without accumulation (the same layer with one call per
  step: how far CBN itself is from BN at A images in this setting).

Every trained network is also evaluated with recomputed inference statistics
(``cbn_plugin.recompute_statistics``, the study's ``--precise``), the weights fixed: CBN from
k batches of the step's images (what the accumulation emulates), BN from batches of the size it
normalised in training (PreciseBN). If a row's gap to the target closes there, it was in the
inference statistics; if not, in the weights training reached.

    .venv/bin/python tools/analysis_tools/accumulation_study.py --cache /tmp/acc.jsonl
    .venv/bin/python tools/analysis_tools/accumulation_study.py --tiny --out-dir /tmp/acc
    .venv/bin/python tools/analysis_tools/accumulation_study.py --from-json docs/accumulation.json

It writes ``docs/accumulation.json`` (every run), ``docs/accumulation.png`` and the generated
block of ``docs/accumulation.md``. One training process at a time; ``--cache`` keeps every
finished run (a rerun resumes); ``--stop-at HH:MM`` (UTC) starts no run after that time and
renders what finished, naming the rows that are missing.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from detection_runner import load_average  # noqa: E402
from detection_runner import meta as study_meta  # noqa: E402
from small_batch.grid import DEFAULT, LARGEST_BATCH, lr_for, spec_for  # noqa: E402
from small_batch.runner import _key, run_jobs  # noqa: E402
from study_markdown import md_table, write_block  # noqa: E402

DOC_BEGIN = '<!-- accumulation:begin (tools/analysis_tools/accumulation_study.py) -->'
DOC_END = '<!-- accumulation:end -->'
MOMENTUM = 0.1  # BN's and CBN's default running-statistics momentum

# row kind -> (label template, norm spec changes to the defaults' row, accumulated?)
ROWS = {
    'bn_large': ('BN, {b} images per step (target)', None, False),
    'bn_accum': ('BN, 1 x {a} accumulated', None, True),
    'cbn_merge': ("CBN defaults, 1 x {a}, accumulation='merge'", {}, True),
    'cbn_own': ("CBN defaults, 1 x {a}, accumulation='own'", {'accumulation': 'own'}, True),
    'rho0_merge': ("CBN rho=0, 1 x {a}, 'merge'", {'rho': 0.0}, True),
    'rho05_merge': ("CBN rho=0.5, 1 x {a}, 'merge'", {'rho': 0.5}, True),
    # the running-statistics momentum divided by A: for a layer that updates them at every
    # call (A times per step), they average over as many steps as without accumulation
    'merge_momentum': ("CBN defaults, 1 x {a}, 'merge', momentum 0.1 / {a}", 'momentum', True),
    'cbn_two_pass': ("CBN defaults, 1 x {a}, accumulation='two_pass'",
                     {'accumulation': 'two_pass'}, True),
    'rho0_two_pass': ("CBN rho=0, 1 x {a}, 'two_pass'", {'rho': 0.0, 'accumulation': 'two_pass'},
                      True),
    'bn_step': ("BN over the step's micro-batches, 1 x {a} (window_size=1, 'two_pass')",
                'bn_step', True),
    'cbn_large': ('CBN defaults, {b} images per step (no accumulation)', {}, False),
}
# the order runs start in within one accumulation count and seed
ROW_ORDER = list(ROWS)


def row_label(kind: str, accumulate: int, micro: int) -> str:
    return ROWS[kind][0].format(a=accumulate, b=accumulate * micro)


def make_job(kind: str, accumulate: int, seed: int, args) -> dict:
    template, changes, accumulated = ROWS[kind]
    images = accumulate * args.micro_batch
    if changes is None:
        norm = dict(kind='bn')
    elif changes == 'momentum':
        norm = dict(spec_for(DEFAULT, images), momentum=MOMENTUM / accumulate)
    elif changes == 'bn_step':
        norm = dict(kind='cbn', window=1, accumulation='two_pass')
    else:  # the study's defaults row (CBN(c, window_size=k)) plus this row's changes
        norm = dict(spec_for(DEFAULT, images), **changes)
    per_call = args.micro_batch if accumulated else images
    return dict(group='accumulation', label=row_label(kind, accumulate, args.micro_batch),
                row=kind, task='shift5', arch='resnet', norm=norm, batch=images,
                accumulate=accumulate if accumulated else 1, samples=args.samples, wd=5e-4,
                lr=lr_for(images, args.base_lr), base_lr=args.base_lr, seed=seed, measure=0,
                precise_samples=args.precise_samples,
                # CBN: k batches of the step's images; BN: the batch it normalised in training
                precise_batch=images if norm['kind'] == 'cbn' else per_call)


# rows that answer the question first; the no-accumulation CBN reference after them
REFERENCE_ROWS = ('cbn_large',)


def build_jobs(args) -> list[dict]:
    """In the order they start: each accumulation count; its rows for every seed, the
    reference rows last; within that, each seed, each row (seed 0 of every row first)."""
    jobs = []
    for a in args.accumulate:
        for reference in (False, True):
            jobs += [make_job(kind, a, seed, args) for seed in range(args.seeds)
                     for kind in args.rows if (kind in REFERENCE_ROWS) == reference]
    return jobs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out-dir', type=Path, default=REPO / 'docs')
    ap.add_argument('--tiny', action='store_true',
                    help='1 seed, 48 images: checks the pipeline in seconds')
    ap.add_argument('--cache', type=Path, default=None,
                    help='json-lines file of finished runs: appended to, and reused (resume)')
    ap.add_argument('--from-json', type=Path, default=None,
                    help="re-render the md from an earlier run's json (no training)")
    ap.add_argument('--accumulate', type=int, nargs='+', default=[4],
                    help='micro-batches per optimizer step (one table section each)')
    ap.add_argument('--micro-batch', type=int, default=1, help='images per micro-batch')
    ap.add_argument('--rows', nargs='+', choices=ROW_ORDER, default=ROW_ORDER)
    ap.add_argument('--seeds', type=int, default=2)
    ap.add_argument('--samples', type=int, default=2048, help='training images every run sees')
    ap.add_argument('--base-lr', type=float, default=0.1,
                    help=f'lr at {LARGEST_BATCH} images per step (linear scaling below)')
    ap.add_argument('--precise-samples', type=int, default=1024,
                    help='training images the recomputed statistics see')
    ap.add_argument('--stop-at', default=None,
                    help='HH:MM (UTC): start no run after this time; render what finished')
    args = ap.parse_args(argv)
    for name in ('accumulate',):
        bad = [v for v in getattr(args, name) if v < 2]
        if bad:
            ap.error(f'--{name} takes micro-batch counts >= 2 (1 is no accumulation), got {bad}')
    if args.stop_at is not None:
        try:
            time.strptime(args.stop_at, '%H:%M')
        except ValueError:
            ap.error(f'--stop-at takes HH:MM (UTC), got {args.stop_at!r}')
    if args.tiny:
        args.seeds, args.samples, args.precise_samples = 1, 48, 32
    return args


def _past(stop_at: str | None) -> bool:
    if stop_at is None:
        return False
    now = time.gmtime()
    hour, minute = (int(v) for v in stop_at.split(':'))
    return (now.tm_hour, now.tm_min) >= (hour, minute)


def run(args, log=print) -> tuple[list, list, float]:
    """Run the jobs one at a time in order; returns (finished results, missing jobs, wall)."""
    jobs = build_jobs(args)
    done, missing, wall = [], [], 0.0
    for i, job in enumerate(jobs):
        cached = _cached(args.cache, job)
        if cached is None and _past(args.stop_at):
            missing.append(job)
            continue
        log(f'[{i + 1}/{len(jobs)}] {job["label"]} seed {job["seed"]}')
        results, seconds = run_jobs([job], 1, log=log, cache=args.cache)
        wall += seconds
        done.append(results[0])
    return done, missing, wall


def _cached(cache: Path | None, job: dict):
    if cache is None or not cache.is_file():
        return None
    key = _key(job)
    for line in cache.read_text().splitlines():
        res = json.loads(line)
        if _key(res['cfg']) == key:
            return res
    return None


def _fmt(values, digits=3) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return 'n/a'
    mean = f'{np.mean(values):.{digits}f}'
    if len(values) == 1:
        return mean
    per_seed = ' / '.join(f'{v:.{digits}f}' for v in values)
    return f'{mean} ± {np.std(values):.{digits}f} ({per_seed})'


def _pts(value) -> str:
    return 'n/a' if value is None or math.isnan(value) else f'{100 * value:+.1f}'


def accuracy(res: dict) -> float:
    """Test accuracy with the layer's own running statistics (CBN: 'window', its default)."""
    return res['acc_window']


def render(results: list, missing: list, args, wall: float, meta: dict) -> str:
    out = [f'Command: `{meta["command"]}`', '',
           f'Machine: {meta["machine"]}; {meta["when"]} UTC; load average {meta["load_start"]} '
           f'at the start, {meta.get("load_end", "n/a")} at the end; '
           f'{wall / 60:.0f} min of wall time in this invocation.', '',
           f'Setting: SmallResNet (9 norms, all swapped) on shifted 5x5 digits (`shift5`), '
           f'{args.samples} training images per run (the same images in the same order in '
           f'every row), SGD momentum 0.9, weight decay 5e-4, cosine decay over the optimizer '
           f'steps, lr = {args.base_lr} x images per step / {LARGEST_BATCH}; '
           f'{args.micro_batch} image(s) per micro-batch, loss / A per micro-batch; '
           f'seeds 0-{args.seeds - 1}. Accuracy: test accuracy (719 images) with the '
           f"layer's own running statistics; \"recomputed\": the same weights with "
           f'inference statistics recomputed from {args.precise_samples} training images '
           f'(`cbn_plugin.recompute_statistics`: CBN from k batches of the step\'s images, BN '
           f'from batches of the size it normalised in training). CPU s: the training '
           f"process's CPU time (one thread), not counting the evaluation.", '']
    for a in args.accumulate:
        images = a * args.micro_batch
        rows = [r for r in results if r['cfg']['accumulate'] in (1, a)
                and r['cfg']['batch'] == images]
        target = [accuracy(r) for r in rows if r['cfg']['row'] == 'bn_large']
        target_mean = float(np.mean(target)) if target else float('nan')
        table = []
        for kind in args.rows:
            label = row_label(kind, a, args.micro_batch)
            rs = sorted((r for r in rows if r['cfg']['row'] == kind),
                        key=lambda r: r['cfg']['seed'])
            accs = [accuracy(r) for r in rs]
            precise = [r.get('acc_precise', float('nan')) for r in rs]
            k = rs[0]['cfg']['norm'].get('window', '-') if rs else '-'
            ok = all(r['status'] == 'ok' for r in rs)
            table.append([
                label, k, f'{len(rs)}/{args.seeds}', _fmt(accs),
                _pts(np.mean(accs) - target_mean) if accs else 'n/a',
                _fmt(precise),
                _pts(np.nanmean(precise) - target_mean) if rs else 'n/a',
                _fmt([r['final_loss'] for r in rs], 2),
                f"{np.mean([r['cpu_time'] for r in rs]):.0f}" if rs else 'n/a',
                (f"{rs[0]['steps_done']} / {rs[0]['forward_calls']}" if rs else 'n/a')
                + ('' if ok else ' (' + '; '.join(r['status'] for r in rs) + ')')])
        out += [f'### 1 x {a}: {images} images per optimizer step, k = '
                f'{LARGEST_BATCH // images} for CBN', '',
                md_table(['row', 'k', 'seeds', 'accuracy (per seed)', 'vs target (points)',
                          'recomputed statistics (per seed)', 'vs target (points)',
                          'final training loss', 'CPU s per run',
                          'optimizer steps / forward calls'], table), '']
    if missing:
        out += ['**Not run** (the invocation stopped launching at '
                f'{args.stop_at} UTC): '
                + '; '.join(f'{j["label"]} seed {j["seed"]}' for j in missing) + '.', '']
    return '\n'.join(out).rstrip('\n')


def plot(results: list, args, path: Path) -> None:
    """Per accumulation count: each row's accuracy with its own running statistics and with
    recomputed statistics (mean bar, one dot per seed); the target's accuracy as a line."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    counts = list(args.accumulate)
    fig, axes = plt.subplots(1, len(counts), figsize=(7.5 * len(counts), 4.8), squeeze=False)
    for ax, a in zip(axes[0], counts):
        images = a * args.micro_batch
        rows = [r for r in results if r['cfg']['accumulate'] in (1, a)
                and r['cfg']['batch'] == images]
        kinds = [k for k in args.rows if any(r['cfg']['row'] == k for r in rows)]
        for j, (field, colour, name) in enumerate((
                ('acc_window', 'C0', 'running statistics (as trained)'),
                ('acc_precise', 'C1', 'recomputed statistics'))):
            for i, kind in enumerate(kinds):
                vals = [r.get(field, float('nan')) for r in rows if r['cfg']['row'] == kind]
                y = i + (j - 0.5) * 0.38
                ax.barh(y, np.nanmean(vals), height=0.36, color=colour,
                        label=name if i == 0 else None)
                ax.plot(vals, [y] * len(vals), 'k.', ms=4)
        target = [r['acc_window'] for r in rows if r['cfg']['row'] == 'bn_large']
        if target:
            ax.axvline(np.mean(target), color='k', ls='--', lw=1,
                       label=f'target: BN, {images} images per step')
        ax.set_yticks(range(len(kinds)))
        ax.set_yticklabels([row_label(k, a, args.micro_batch) for k in kinds], fontsize=8)
        ax.invert_yaxis()
        accs = [r[f] for r in rows for f in ('acc_window', 'acc_precise') if f in r]
        ax.set_xlim(max(0.0, min(accs + [1.0]) - 0.05), min(1.0, max(accs + [0.0]) + 0.03))
        ax.set_xlabel('test accuracy')
        ax.set_title(f'1 x {a} accumulated ({images} images per step), '
                     f'{args.samples} images, {args.seeds} seeds', fontsize=9)
        ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.4, -0.12), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = study_meta('tools/analysis_tools/accumulation_study.py', argv)  # command, machine
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        meta, wall, results = saved['meta'], saved['wall_s'], saved['runs']
        missing = saved['missing']
        for k, v in saved['args'].items():
            if k not in ('out_dir', 'from_json', 'cache'):
                setattr(args, k, v)
    else:
        results, missing, wall = run(args, log=lambda s: print(s, flush=True))
        meta['load_end'] = load_average()
        (args.out_dir / 'accumulation.json').write_text(json.dumps(
            dict(meta=meta, args={k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(args).items()},
                 wall_s=wall, runs=results, missing=missing), indent=1, default=float) + '\n')
    block = render(results, missing, args, wall, meta)
    if results:
        plot(results, args, args.out_dir / 'accumulation.png')
    write_block(args.out_dir / 'accumulation.md', DOC_BEGIN, DOC_END, block,
                'Gradient accumulation with BN and CBN')
    print(block)
    return results


if __name__ == '__main__':
    main()
