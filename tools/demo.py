"""The detection demo (``make demo``): CBN where BN fails, a detector at 1 image per step.

``make demo`` runs this script with no arguments. It

1. writes the handwritten-digits detection set of the small-batch detection study
   (``tools/make_digits_det.py``: scikit-learn's real 8x8 digits on cluttered 128-px
   canvases, 10 classes, train/val split by source digit) unless it is there;
2. trains the study's Faster R-CNN R18-w32-FPN from scratch with CBN (the defaults,
   window 4) in *every* norm layer at 1 image per optimizer step: the ``cbn`` row of
   ``tools/analysis_tools/small_batch_detection.py``, seed 0, one torch thread;
3. validates it (COCO box mAP on the val canvases, unseen digits) and prints its mAP
   beside the committed rows of that study (``docs/small_batch_detection.json``): BN at
   the same batch, BN at the large batch, GN, and the rest, naming the command that
   regenerates them (``make demo-compare``).

``--row`` trains another row of the study instead (``--row bn``: BN at 1 image, the
failure), ``--seed`` another seed. ``--tiny`` runs the pipeline in seconds on a tiny set
(the study's ``--tiny`` setting); committed rows of another setting are not compared.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / 'tools' / 'analysis_tools' / 'small_batch_detection.py'
COMMITTED = REPO / 'docs' / 'small_batch_detection.json'
REGENERATE = 'make demo-compare'


def load_study():
    """The study tool as a module (it lives in tools/analysis_tools/, not a package)."""
    spec = importlib.util.spec_from_file_location('small_batch_detection', STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault('small_batch_detection', module)
    spec.loader.exec_module(module)
    return module


def committed_rows(study, path: Path, setting: dict) -> tuple[list[dict], str]:
    """The committed study's rows (mean and spread over seeds) if it ran this setting;
    otherwise no rows and the reason."""
    if not path.is_file():
        return [], f'no committed comparison at {path}'
    run = json.loads(path.read_text())
    if run['setting'] != setting:
        diff = sorted(k for k in setting if run['setting'].get(k) != setting[k])
        return [], (f'the committed comparison ({path.name}) ran another setting '
                    f'(differs in {", ".join(diff)}); not compared')
    return study.summarise(run['results'], run['rows']), (
        f'committed: `{run["command"]}` on {run["when"]}, seeds {run["seeds"]}')


def table(mine: dict, label: str, rows: list[dict]) -> str:
    """This run's line, then the committed rows (mean over seeds, spread max - min)."""
    def f(x):
        return f'{x:.3f}' if isinstance(x, (int, float)) and math.isfinite(x) else 'n/a'

    def steps(batch, accum):
        return f'{batch} x {accum}' if accum > 1 else str(batch)

    head = ('', 'row', 'images per step', 'seeds', 'mAP', 'spread', 'mAP50', 'CPU per run')
    job = mine['job']
    lines = [('this run', label, steps(job['batch'], job['accum']), str(job['seed']),
              f(mine['mAP']), '', f(mine['mAP50']), f'{mine["cpu_s"]:.0f} s')]
    for r in rows:
        lines.append(('committed', r['label'], steps(r['batch'], r['accum']), str(r['seeds']),
                      f(r['mAP']), f(r['mAP_spread']), f(r['mAP50']),
                      f'{r["cpu_s"]:.0f} s' if math.isfinite(r['cpu_s']) else 'n/a'))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = '  '.join(f'{{:<{w}}}' if i < 2 else f'{{:>{w}}}' for i, w in enumerate(widths))
    return '\n'.join([fmt.format(*head)] + [fmt.format(*line) for line in lines])


def parse_args(argv=None, rows=()):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('--row', choices=list(rows), default='cbn',
                    help='the row of the small-batch detection study to train')
    ap.add_argument('--seed', type=int, default=0, help='training seed')
    ap.add_argument('--tiny', action='store_true',
                    help='the study\'s tiny setting: the pipeline in seconds')
    ap.add_argument('--data-root', type=Path, default=REPO / 'data' / 'small_batch_det')
    ap.add_argument('--work-dir', type=Path, default=REPO / 'work_dirs' / 'demo')
    ap.add_argument('--committed', type=Path, default=COMMITTED,
                    help='the comparison json whose rows are printed beside this run')
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    study = load_study()
    args = parse_args(argv, study.ROWS)
    wall = time.perf_counter()
    # The study's own setting (its defaults, or its --tiny ones): the committed rows
    # are comparable only if this run is one of their jobs.
    setting = study.setting_from_args(study.parse_args(['--tiny'] if args.tiny else []))
    start = time.perf_counter()
    data_root = study.ensure_data(args.data_root, setting)
    print(f'data: {data_root} ({setting["num_train"]} train / {setting["num_val"]} val '
          f'canvases, {time.perf_counter() - start:.0f} s)', flush=True)
    job = study.make_job(args.row, setting, args.seed, data_root, args.work_dir)
    label = study.ROWS[args.row]['label']
    per_step = job['images_per_step']
    print(f'training: {label}, {per_step} image(s) per step, every norm layer of a '
          f'Faster R-CNN R18-w32-FPN from scratch, {setting["images"]} images seen, '
          f'one torch thread', flush=True)
    [result] = study.run_jobs([job], workers=0)  # in this process; writes result.json
    rows, source = committed_rows(study, args.committed, setting)
    print(f'\nCOCO box mAP on {setting["num_val"]} val canvases of unseen digits '
          f'({study.setting_name(setting)}):\n')
    print(table(result, label, rows))
    print(f'\n{source}' + (f'; `{REGENERATE}` regenerates every row '
                          f'(docs/small_batch_detection.md)' if rows else ''))
    same = [r for r in rows if r['row'] == args.row]
    if same:
        seed = [p for p in same[0]['per_seed'] if p['seed'] == args.seed]
        if seed:
            print(f'the committed {label}, seed {args.seed}: mAP {seed[0]["mAP"]:.3f} '
                  f'(this run: {result["mAP"]:.3f})')
    print(f'total {(time.perf_counter() - wall) / 60:.1f} min (load average now '
          f'{" ".join(f"{x:.2f}" for x in os.getloadavg())})', flush=True)
    if result['status'] != 'ok' or not math.isfinite(result['mAP']):
        raise SystemExit(f'the run did not finish: {result["status"]}')
    return result


if __name__ == '__main__':
    main()
