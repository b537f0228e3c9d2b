"""CBN's window on the small-batch detection study: mAP and cost against k, GN beside it.

Each run is one job of ``small_batch_detection.py`` (the study's setting, one row, one
seed: what ``--rows ROW --small B --window k --seeds S`` trains), run by the study's runner
(``detection_runner``); its result goes into its own folder under ``--out-dir``:
``cbn_b{B}_L{B*k}_s{S}`` for CBN at ``B`` images per step with a window of ``k`` steps (the
study's ``--window k``; the folder names the images pooled, ``B*k``), ``gn_b{B}_L4_s{S}``
for GN. A folder that already holds a finished run is reused, so an interrupted sweep
resumes and runs made one at a time join the table. The table (every finished run under
``--out-dir``, whichever invocation made it) goes into the generated block of
``docs/small_batch_detection.md`` and every run into ``docs/window_sweep.json``.

    # the sweep at 1 image per step, 3 seeds, GN beside it (one process per run)
    .venv/bin/python tools/analysis_tools/window_sweep.py --batches 1 --windows 4 8 16 32 \\
        --seeds 0 1 2 --out-dir /tmp/sweep/out
    # the table only, from the runs already there
    .venv/bin/python tools/analysis_tools/window_sweep.py --batches 1 --windows 4 8 16 32 \\
        --seeds 0 1 2 --out-dir /tmp/sweep/out --render-only
    # the memory the windows hold, the study's detector and R50-FPN (neck + head CBN)
    .venv/bin/python tools/analysis_tools/window_sweep.py --memory --windows 4 8 16 32
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import small_batch_detection as sbd  # noqa: E402
from study_markdown import md_table, write_block  # noqa: E402

STUDY = Path(__file__).resolve().parent / 'small_batch_detection.py'
DOC_BEGIN = '<!-- window-sweep:begin (written by tools/analysis_tools/window_sweep.py; do not edit) -->'
DOC_END = '<!-- window-sweep:end -->'
STUDY_LARGE = 4  # the study's large batch (its --large 4), for every run of the sweep
RUN_NAME = re.compile(r'^(gn|cbn)_b(\d+)_L(\d+)_s(\d+)$')


def run_name(row: str, batch: int, window: int | None, seed: int) -> str:
    large = STUDY_LARGE if row == 'gn' else batch * window
    return f'{row}_b{batch}_L{large}_s{seed}'


def plan(args) -> list[dict]:
    """Every run of the sweep: GN first at each batch (the cheapest), then CBN by window."""
    runs = []
    for batch in args.batches:
        specs = ([('gn', None)] if args.gn else []) + [('cbn', k) for k in args.windows]
        for seed in args.seeds:
            for row, k in specs:
                runs.append(dict(row=row, batch=batch, window=k, seed=seed,
                                 name=run_name(row, batch, k, seed)))
    return runs


def finished(out_dir: Path, run: dict) -> dict | None:
    """The run's result if its folder holds one that finished."""
    path = out_dir / run['name'] / 'small_batch_detection.json'
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    results = [r for r in data.get('results', []) if r.get('status') == 'ok']
    return dict(results[0], machine=data.get('machine'), when=data.get('when')) if results \
        else None


def command(out_dir: Path, work_dir: Path, run: dict) -> list[str]:
    """The study invocation that trains ``run`` on its own: its row, batch and seed, and for
    CBN the sweep's window (``--window``); the sweep trains the same job (``job``)."""
    window = [] if run['row'] == 'gn' else ['--window', str(run['window'])]
    return [sys.executable, str(STUDY), '--rows', run['row'], '--small', str(run['batch']),
            '--large', str(STUDY_LARGE), *window, '--seeds', str(run['seed']), '--workers',
            '1', '--out-dir', str(out_dir / run['name']),
            '--work-dir', str(work_dir / run['name'])]


def job(run: dict, data_root: Path, work_dir: Path) -> dict:
    """The study's job of ``run`` in the study's default setting: the job ``command`` trains."""
    setting = dict(sbd.setting_from_args(sbd.parse_args([])), small=run['batch'],
                   large=STUDY_LARGE)
    return sbd.make_job(run['row'], setting, run['seed'], data_root,
                        work_dir / run['name'] / 'compare', window=run['window'])


def train(runs: list[dict], out_dir: Path, work_dir: Path, workers: int, log=print) -> None:
    """Train ``runs`` with the study's runner (``workers`` child processes, one torch
    thread each); each finished run goes into its folder as the study writes it, where
    ``finished`` and ``collect`` read it."""
    import platform
    setting = sbd.setting_from_args(sbd.parse_args([]))
    data_root = sbd.ensure_data(REPO / 'data' / 'small_batch_det', setting)
    machine = f'{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}'
    jobs = [job(r, data_root, work_dir) for r in runs]
    folder_of = {j['work_dir']: out_dir / r['name'] for r, j in zip(runs, jobs)}

    def record(done, result):
        folder = folder_of[done['work_dir']]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / 'small_batch_detection.json').write_text(json.dumps(dict(
            machine=machine, when=time.strftime('%Y-%m-%d %H:%M'), results=[result]),
            indent=1, default=float) + '\n')

    sbd.run_jobs(jobs, workers, log=log, reuse=True, costliest_first=False, on_result=record)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return 'n/a'
    per = ' / '.join(f'{v:.3f}' for v in values)
    if len(values) == 1:
        return f'{values[0]:.3f}'
    return f'{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({per})'


def collect(out_dir: Path) -> dict:
    """Every finished run under ``out_dir`` (this sweep's or an earlier one's), by
    ``(batch, row, window)``: ``[(seed, result), ...]``."""
    found = {}
    for folder in sorted(out_dir.iterdir()) if out_dir.is_dir() else ():
        match = RUN_NAME.match(folder.name)
        if not match:
            continue
        row, batch, large, seed = match.group(1), *(int(v) for v in match.groups()[1:])
        window = None if row == 'gn' else large // batch
        result = finished(out_dir, dict(name=folder.name))
        if result is not None:
            found.setdefault((batch, row, window), []).append((seed, result))
    return found


def render(found: dict) -> tuple[str, list]:
    """The markdown block and the json rows of ``collect``'s runs: by batch, GN then CBN
    by window."""
    rows, records = [], []
    order = sorted(found, key=lambda key: (key[0], key[1] != 'gn', key[2] or 0))
    for batch, row, k in order:
        done = sorted(found[batch, row, k], key=lambda item: item[0])
        cpu = [r['cpu_s'] for _, r in done if r.get('cpu_s') is not None]
        rows.append([batch, 'GN' if row == 'gn' else f'CBN, k = {k}',
                     '-' if row == 'gn' else str(batch * k),
                     ', '.join(str(seed) for seed, _ in done),
                     _mean_sd([r['mAP'] for _, r in done]),
                     _mean_sd([r['mAP50'] for _, r in done]).split(' (')[0],
                     f'{statistics.mean(cpu):.0f}' if cpu else 'n/a'])
        for seed, r in done:
            records.append(dict(row=row, batch=batch, window=k, seed=seed, mAP=r['mAP'],
                                mAP50=r['mAP50'], final_loss=r.get('final_loss'),
                                cpu_s=r.get('cpu_s'), machine=r.get('machine'),
                                when=r.get('when')))
    table = md_table(['images per step', 'norm', 'images pooled', 'seeds', 'mAP (seeds)',
                      'mAP50', 'CPU s per run'], rows)
    command = 'python tools/analysis_tools/window_sweep.py ' + ' '.join(sys.argv[1:])
    machines = sorted({r['machine'] for r in records if r['machine']})
    block = (f'Command (the last that rendered it): `{command}`\n\nMachine: '
             f'{"; ".join(machines) or "n/a"}, one torch thread per run, every run on this '
             f'machine (one process per run, at most two at a time; CPU s is the training '
             f'process\'s CPU time). Rendered {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}.'
             f'\n\n{table}')
    return block, records


def window_numel(layer, window: int) -> int:
    """The numbers a bound CBN layer's window holds at ``window`` steps: per past step the
    mean and variance (C each), the mean input patch (groups x P') and dvar/dW (C x P')."""
    conv, c = layer.bound_conv, layer.num_features
    patch = conv.weight[0].numel()
    return (window - 1) * (2 * c + conv.groups * patch + c * patch)


def memory_table(windows: list[int]) -> str:
    """MiB of window state (float32) per k: the digits detector with every norm CBN and
    R50-FPN 4conv1fc with CBN in the neck and the box head, beside their parameters."""
    from types import SimpleNamespace

    import cbn_plugin
    from benchmark import detector_cfg
    from host_overhead import digits_detector
    from mmdet.registry import MODELS
    norm = dict(type='CBN', window_size=2, requires_grad=True)
    models = {'digits detector, every norm CBN': digits_detector(norm, 'cpu'),
              'R50-FPN 4conv1fc, neck + head CBN': MODELS.build(
                  detector_cfg(norm, SimpleNamespace(rois_per_image=512)))}
    rows = []
    for name, model in models.items():
        cbn_plugin.bind(model, logger=None)
        layers = [layer for _, layer in cbn_plugin.cbn_layers(model)]
        params = sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20
        rows.append([name, len(layers), f'{params:.0f}'] + [
            f'{sum(window_numel(layer, k) for layer in layers) * 4 / 2 ** 20:.0f}'
            for k in windows])
    return md_table(['model', 'CBN layers', 'parameters MiB']
                    + [f'window k = {k}, MiB' for k in windows], rows)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--batches', type=int, nargs='+', default=[1], help='images per step')
    ap.add_argument('--windows', type=int, nargs='+', default=[4, 8, 16, 32],
                    help="CBN's window k (optimizer steps)")
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--no-gn', dest='gn', action='store_false', help='leave out the GN rows')
    ap.add_argument('--workers', type=int, default=1, help='runs at a time (one thread each)')
    ap.add_argument('--out-dir', type=Path, default=Path('/tmp/window_sweep'))
    ap.add_argument('--work-dir', type=Path, default=None,
                    help='training work dirs (default: OUT_DIR/work)')
    ap.add_argument('--render-only', action='store_true', help='run nothing: table the runs there')
    ap.add_argument('--memory', action='store_true',
                    help="print the windows' memory per k (--windows) and exit; trains nothing")
    ap.add_argument('--doc', type=Path, default=REPO / 'docs' / 'small_batch_detection.md')
    ap.add_argument('--json', type=Path, default=REPO / 'docs' / 'window_sweep.json')
    args = ap.parse_args(argv)
    for name in ('batches', 'windows'):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            ap.error(f'--{name} takes integers >= 1, got {bad}')
    if args.workers < 1:
        ap.error(f'--workers must be >= 1, got {args.workers}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory:
        print(memory_table(args.windows))
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = args.work_dir or args.out_dir / 'work'
    runs = plan(args)
    todo = [r for r in runs if finished(args.out_dir, r) is None]
    if todo and not args.render_only:
        print(f'{len(todo)} of {len(runs)} runs to train, {args.workers} at a time', flush=True)
        train(todo, args.out_dir, work_dir, args.workers, log=lambda s: print(s, flush=True))
    found = collect(args.out_dir)
    block, records = render(found)
    write_block(args.doc, DOC_BEGIN, DOC_END, block, 'Small-batch detection')
    args.json.write_text(json.dumps(dict(command=sys.argv, runs=records), indent=1) + '\n')
    missing = [r['name'] for r in runs if finished(args.out_dir, r) is None]
    print(block)
    if missing:
        print(f'missing: {missing}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
