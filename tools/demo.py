"""The detection demo (``make demo``): CBN where BN fails, a detector at 1 image per step.

``make demo`` runs this script with no arguments. It

1. writes the handwritten-digits detection set the config names (``tools/make_digits_det.py``:
   scikit-learn's real 8x8 digits on cluttered 128-px canvases, 10 classes, train/val split
   by source digit) unless it is there;
2. trains the config's detector with mmengine's Runner and one torch thread; the default
   config (``faster-rcnn_r18-w32_fpn_4conv1fc-cbn-all_1xb1-2400img_digits.py`` in
   ``configs/small_batch_det/``) is a Faster R-CNN R18-w32-FPN from scratch with CBN (the
   defaults: ``CBNHook`` derives a window of 32 steps) in *every* norm layer at 1 image per
   optimizer step;
3. validates it (COCO box mAP on the val canvases, unseen digits) and prints its mAP beside
   the committed rows of the small-batch detection comparison
   (``docs/small_batch_detection.json``: BN at the same batch, BN at the large batch, GN and
   the rest), naming the command that regenerates them (``make demo-compare``), and then
   the same rows trained longer, at equal images and at equal compute (the converged
   comparison so far, ``docs/small_batch_detection_converged.json``).

Each demo config is one run of that comparison (its ``demo`` entry names the row and the
setting; ``tests/test_demo.py`` checks that the study builds the same config for it).
``--config`` trains another one (the BN row at 1 image, the failure:
``configs/small_batch_det/faster-rcnn_r18-w32_fpn_4conv1fc-bn-all_1xb1-2400img_digits.py``),
``--seed`` another seed. ``--tiny`` runs the pipeline in seconds (the study's tiny setting);
committed rows of another setting are not compared.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))

import make_digits_det  # noqa: E402

CONFIGS = REPO / 'configs' / 'small_batch_det'
DEFAULT_CONFIG = CONFIGS / 'faster-rcnn_r18-w32_fpn_4conv1fc-cbn-all_1xb1-2400img_digits.py'
TINY_CONFIG = CONFIGS / 'faster-rcnn_r18-w8_fpn_4conv1fc-cbn-all_1xb1-8img_digits-64px.py'
COMMITTED = REPO / 'docs' / 'small_batch_detection.json'
CONVERGED = REPO / 'docs' / 'small_batch_detection_converged.json'
STEP_COST = REPO / 'docs' / 'small_batch_detection_step_cost.json'
REGENERATE = 'make demo-compare'


def write_data(root: Path, setting: dict) -> Path:
    """The digits set of the config's setting under ``root`` (written once, then found)."""
    return make_digits_det.ensure(root, num_train=setting['num_train'],
                                  num_val=setting['num_val'], size=setting['size'],
                                  seed=setting['data_seed'], digits=setting['digits'],
                                  digit_px=setting['digit_px'], clutter=setting['clutter'])


def load_config(path: Path, data_root: Path, work_dir: Path, seed: int):
    """The config at ``path`` with its loaders and evaluators on ``data_root``, its logs in
    ``work_dir`` and its training seed ``seed``."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(path))
    root = str(data_root).rstrip('/') + '/'
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = root
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        evaluator.ann_file = root + 'annotations/val.json'
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(cfg.randomness, seed=seed)
    return cfg


def train(cfg) -> dict:
    """Train and validate ``cfg`` in this process with one torch thread; what it measured."""
    import torch
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads were slower than 1
    import cbn_plugin  # noqa: F401  (registers CBN and CBNHook)
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner
    register_all_modules(init_default_scope=False)
    runner = Runner.from_cfg(cfg)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    runner.train()  # validates once, after the last iteration (val_interval = max_iters)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    hub = runner.message_hub
    metric = lambda key: float(hub.get_scalar(f'val/coco/{key}').current())  # noqa: E731
    return dict(mAP=metric('bbox_mAP'), mAP50=metric('bbox_mAP_50'), mAP75=metric('bbox_mAP_75'),
                losses=[float(v) for v in hub.get_scalar('train/loss').data[0]],
                cpu_s=usage.ru_utime + usage.ru_stime - cpu_start)


def committed_rows(path: Path, setting: dict) -> tuple[list[dict], str]:
    """The committed comparison's rows (mean and spread over seeds) if it ran this setting;
    otherwise no rows and the reason."""
    if not path.is_file():
        return [], f'no committed comparison at {path}'
    run = json.loads(path.read_text())
    if run['setting'] != setting:
        diff = sorted(k for k in setting if run['setting'].get(k) != setting[k])
        return [], (f'the committed comparison ({path.name}) ran another setting '
                    f'(differs in {", ".join(diff)}); not compared')
    def mean_and_spread(values):
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return float('nan'), float('nan')
        return sum(finite) / len(finite), max(finite) - min(finite)

    rows = []
    for row in run['rows']:
        results = [r for r in run['results'] if r['job']['row'] == row]
        job = results[0]['job']
        mAP, spread = mean_and_spread([r['mAP'] for r in results])
        rows.append(dict(row=row, label=job['label'], batch=job['batch'], accum=job['accum'],
                         seeds=len(results), mAP=mAP, mAP_spread=spread,
                         mAP50=mean_and_spread([r['mAP50'] for r in results])[0],
                         cpu_s=mean_and_spread([r.get('cpu_s', math.nan) for r in results])[0],
                         per_seed={r['job']['seed']: r['mAP'] for r in results}))
    return rows, f'committed: `{run["command"]}` on {run["when"]}, seeds {run["seeds"]}'


def table(mine: dict, rows: list[dict]) -> str:
    """This run's line, then the committed rows (mean over seeds, spread max - min)."""
    def f(x):
        return f'{x:.3f}' if isinstance(x, (int, float)) and math.isfinite(x) else 'n/a'

    def steps(batch, accum):
        return f'{batch} x {accum}' if accum > 1 else str(batch)

    head = ('', 'row', 'images per step', 'seeds', 'mAP', 'spread', 'mAP50', 'CPU per run')
    lines = [('this run', mine['label'], steps(mine['batch'], mine['accum']), str(mine['seed']),
              f(mine['mAP']), '', f(mine['mAP50']), f'{mine["cpu_s"]:.0f} s')]
    for r in rows:
        lines.append(('committed', r['label'], steps(r['batch'], r['accum']), str(r['seeds']),
                      f(r['mAP']), f(r['mAP_spread']), f(r['mAP50']),
                      f'{r["cpu_s"]:.0f} s' if math.isfinite(r['cpu_s']) else 'n/a'))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = '  '.join(f'{{:<{w}}}' if i < 2 else f'{{:>{w}}}' for i, w in enumerate(widths))
    return '\n'.join([fmt.format(*head)] + [fmt.format(*line) for line in lines])


def on_curve(points: list[tuple[float, float]], cpu: float) -> float | None:
    """mAP at ``cpu`` on a row's curve through its budgets ``(CPU, mAP)``, linear between
    the two around it; ``None`` outside them."""
    points = sorted(points)
    for (c0, m0), (c1, m1) in zip(points, points[1:]):
        if c0 <= cpu <= c1:
            return m0 + (m1 - m0) * (cpu - c0) / (c1 - c0) if c1 > c0 else max(m0, m1)
    return None


def same_setting(a: dict, b: dict) -> bool:
    """Whether two study settings are the same but for the budget (each budget its own)."""
    def fixed(s):
        return {k: v for k, v in s.items() if k != 'images'}
    return fixed(a) == fixed(b)


def step_costs(path: Path | None, setting: dict) -> dict[str, float]:
    """Row -> CPU seconds per training image, measured side by side (the study's
    ``--step-cost`` json at ``path``); empty when there is none for this setting."""
    if path is None or not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if not same_setting(saved['setting'], setting):
        return {}
    return {r['row']: r['s_per_image'] for r in saved['results']}


def trained_longer(path: Path, setting: dict, row: str, step_cost: Path | None = None
                   ) -> list[str]:
    """The converged comparison's runs so far, for GN and ``row``: mAP and CPU per run at
    every budget (images seen, each its own schedule), and GN's mAP, on its curve through
    its budgets, at the CPU ``row`` spent at this setting's budget: equal compute.

    The CPU of a run is its images times its row's CPU per training image measured side
    by side (``step_cost``, the study's ``--step-cost`` json) where both rows have one: the
    runs' own CPU depends on the load beside them and on the machine (the comparison's
    come from more than one). Otherwise the runs' own. This run's CPU is not compared."""
    if not path.is_file():
        return [f'no converged comparison at {path}']
    run = json.loads(path.read_text())
    costs = step_costs(step_cost, setting)
    side_by_side = 'gn' in costs and row in costs
    if not same_setting(run['setting'], setting):
        return [f'the converged comparison ({path.name}) ran another setting; not compared']
    runs: dict[tuple, list[dict]] = {}
    for r in run['results']:
        if r.get('status') == 'ok' and r['job']['row'] in ('gn', row):
            runs.setdefault((r['job']['setting']['images'], r['job']['row']), []).append(r)
    if not runs:
        return []
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731

    def cpu_of(images, name, rs):
        return images * costs[name] if side_by_side else mean(rs, 'cpu_s')
    lines = [f'Trained longer (the converged comparison so far, {path.name}: `{run["command"]}`'
             f'), mean over seeds; CPU per run: '
             + (f'images x the row\'s CPU per image measured side by side ({step_cost.name})'
                if side_by_side else 'the runs\' own') + ':', '']
    for (images, name), rs in sorted(runs.items()):
        lines.append(f'  {images:>6,} images  {rs[0]["job"]["label"]:<24} {len(rs)} seed(s)  '
                     f'mAP {mean(rs, "mAP"):.3f}  CPU per run {cpu_of(images, name, rs):,.0f} s')
    gn = [(cpu_of(images, name, rs), mean(rs, 'mAP')) for (images, name), rs in runs.items()
          if name == 'gn']
    mine = runs.get((setting['images'], row))
    if mine:
        cpu, mAP = cpu_of(setting['images'], row, mine), mean(mine, 'mAP')
        at = on_curve(gn, cpu)
        label = mine[0]['job']['label']
        lines += ['', f'At equal compute: {label} at {setting["images"]:,} images '
                  f'costs {cpu:,.0f} s per run for mAP {mAP:.3f}; GN trained for that CPU: '
                  + (f'mAP {at:.3f} on its curve' if at is not None
                     else 'outside the budgets GN has run')]
    return lines


def setting_name(s: dict) -> str:
    return (f'{s["size"]}px w{s["width"]} {s["images"]} img, digits {s["digits"][0]}-'
            f'{s["digits"][1]} of {s["digit_px"][0]}-{s["digit_px"][1]}px, clutter '
            f'{s["clutter"][0]}-{s["clutter"][1]}, train {s["num_train"]}, lr '
            f'{s["lr_per_image"]:g}/image')


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('--config', type=Path, default=DEFAULT_CONFIG,
                    help='a config with a demo entry (configs/small_batch_det/*_1xb1-*)')
    ap.add_argument('--seed', type=int, default=0, help='training seed')
    ap.add_argument('--tiny', action='store_true',
                    help=f'the study\'s tiny setting, the pipeline in seconds ({TINY_CONFIG.name})')
    ap.add_argument('--data-root', type=Path, default=REPO / 'data' / 'small_batch_det')
    ap.add_argument('--work-dir', type=Path, default=REPO / 'work_dirs' / 'demo',
                    help='the run logs to WORK_DIR/<config>_s<seed>/, with its result.json')
    ap.add_argument('--committed', type=Path, default=COMMITTED,
                    help='the comparison json whose rows are printed beside this run')
    ap.add_argument('--converged', type=Path, default=CONVERGED,
                    help='the converged comparison json: the rows trained longer')
    ap.add_argument('--step-cost', type=Path, default=STEP_COST,
                    help="the rows' CPU per training image, side by side: the equal-compute "
                    'comparison\'s CPU')
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    path = (TINY_CONFIG if args.tiny else args.config).resolve()
    wall = time.perf_counter()
    from mmengine.config import Config
    demo = Config.fromfile(str(path)).get('demo')
    if demo is None:
        raise SystemExit(f'{path} has no demo entry (row, label, setting): the demo trains '
                         f'the configs in {CONFIGS.relative_to(REPO)}/ that name one')
    setting = demo.setting.to_dict()
    start = time.perf_counter()
    data_root = write_data(args.data_root, setting)
    print(f'data: {data_root} ({setting["num_train"]} train / {setting["num_val"]} val '
          f'canvases, {time.perf_counter() - start:.0f} s)', flush=True)
    work_dir = args.work_dir / f'{path.stem}_s{args.seed}'
    cfg = load_config(path, data_root, work_dir, args.seed)
    batch = cfg.train_dataloader.batch_size
    accum = cfg.optim_wrapper.get('accumulative_counts', 1)
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    print(f'training: {demo.label}, {batch * accum} image(s) per step, every norm layer of a '
          f'Faster R-CNN R18-w{setting["width"]}-FPN from scratch, {setting["images"]} images '
          f'seen, one torch thread ({shown})', flush=True)
    result = dict(config=str(path), row=demo.row, label=demo.label, seed=args.seed, batch=batch,
                  accum=accum, iters=cfg.train_cfg.max_iters, **train(cfg))
    (work_dir / 'result.json').write_text(json.dumps(result, default=float) + '\n')
    rows, source = committed_rows(args.committed, setting)
    print(f'\nCOCO box mAP on {setting["num_val"]} val canvases of unseen digits '
          f'({setting_name(setting)}):\n')
    print(table(result, rows))
    print(f'\n{source}' + (f'; `{REGENERATE}` regenerates every row '
                          f'(docs/small_batch_detection.md)' if rows else ''))
    same = [r for r in rows if r['row'] == demo.row]
    if same:
        committed = same[0]['per_seed'].get(args.seed)
        if committed is not None:
            print(f'the committed {demo.label}, seed {args.seed}: mAP {committed:.3f} '
                  f'(this run: {result["mAP"]:.3f})')
        print(f'On another CPU, expect this run to differ from the committed one by about '
              f'the spread between seeds ({same[0]["mAP_spread"]:.3f} mAP for this row): '
              f'floating-point rounding differs between CPUs and libraries, and the '
              f'differences grow over the {result["iters"]} training steps (docs/demo.md).')
    longer = trained_longer(args.converged, setting, demo.row, args.step_cost)
    if longer:
        print('\n' + '\n'.join(longer))
    print(f'total {(time.perf_counter() - wall) / 60:.1f} min (load average now '
          f'{" ".join(f"{x:.2f}" for x in os.getloadavg())})', flush=True)
    if not math.isfinite(result['mAP']):
        raise SystemExit(f'the run gave no mAP ({result["mAP"]}): see {work_dir}')
    return result


if __name__ == '__main__':
    main()
