"""The CPU a training image costs in each row, measured side by side in one process.

The converged comparison's CPU per run is each run's own: it depends on what else the
machine ran and on the machine (the same job took 0.80x the CPU seconds on another machine
of the same kind). Here each row's model (the study's own config, ``build_config``) trains
on the same batches of the study's training set, its steps interleaved with the other
rows' in one process of one torch thread, so the ratios between rows are measured under
one load. CBN rows pool their full window from the start (``set_window_size`` to the
row's ``k``, no burn-in; filled before timing): the cost of a step after burn-in.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from study_markdown import md_table, write_block

from .configs import build_config
from .jobs import make_job
from .report import DOC, TITLE

STEP_COST_JSON = 'small_batch_detection_step_cost.json'
STEP_COST_BEGIN = ('<!-- small-batch-det-step-cost:begin (written by '
                   'tools/analysis_tools/small_batch_detection.py --step-cost; do not edit) -->')
STEP_COST_END = '<!-- small-batch-det-step-cost:end -->'
STEP_COST_ROWS = ['bn-large', 'bn', 'gn', 'cbn', 'cbn-k8', 'cbn-fpn-head', 'cbn-accum']
REFERENCE = 'gn'


def row_step(job: dict, burn_in: bool = False):
    """``(step, model)``: one optimizer step of ``job``'s row (its micro-batches of the
    study's training data, SGD, ``cbn_plugin.step``), its CBN layers pooling the row's
    window, or acting as BN throughout (``burn_in``)."""
    import torch
    from mmdet.registry import MODELS
    from mmengine.runner import Runner

    import cbn_plugin
    cfg = build_config(job)
    torch.manual_seed(job['seed'])
    model = MODELS.build(cfg.model)
    model.train()
    cbn_plugin.bind(model, logger=None)
    for _, layer in cbn_plugin.cbn_layers(model):
        layer.set_window_size(job['norm']['window'])
        if burn_in:
            layer.set_schedule(burn_in_steps=10 ** 9)
    # A small lr: the steps are timed, not trained; the data the row trains on.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loader = iter(Runner.build_dataloader(cfg.train_dataloader, seed=job['seed']))
    micro = [model.data_preprocessor(next(loader), True) for _ in range(job['accum'])]

    def step():
        optimizer.zero_grad()
        for data in micro:
            loss, _ = model.parse_losses(model(**data, mode='loss'))
            loss.backward()
        optimizer.step()
        cbn_plugin.step(model)
    return step, model


def windows_held(model) -> list[int]:
    """The windows the model's CBN layers hold (past steps recorded + the current one)."""
    import cbn_plugin
    return sorted({int(layer.window_filled.max()) + 1 for _, layer in cbn_plugin.cbn_layers(model)
                   if layer.window_filled is not None})


def measure(jobs: dict[str, dict], repeats: int, steps: int, log=print) -> list[dict]:
    """Per row: the median over ``repeats`` of the CPU seconds per step of ``steps``
    steps, every model's steps interleaved with the others' within each repeat; a CBN row
    twice, pooling and in burn-in. Per image, over a run (burn-in for its share of the
    steps, ``setting['burn_in']``), and against the reference over a run."""
    built = {}
    for row, job in jobs.items():
        step, model = row_step(job)
        for _ in range(job['norm'].get('window', 1) + 1):  # the window filled, and one more
            step()
        built[row, 'pooling'] = (step, model)
        if job['norm']['kind'] == 'cbn':
            step, model = row_step(job, burn_in=True)
            step()
            built[row, 'burn-in'] = (step, model)
        log(f'  built and warmed {row}')
    times: dict[tuple, list[float]] = {key: [] for key in built}
    for _ in range(repeats):
        for key, (step, _) in built.items():
            start = time.process_time()
            for _ in range(steps):
                step()
            times[key].append((time.process_time() - start) / steps)
    out = []
    for row, job in jobs.items():
        per_step = statistics.median(times[row, 'pooling'])
        per_image = per_step / job['images_per_step']
        burn = (statistics.median(times[row, 'burn-in']) / job['images_per_step']
                if (row, 'burn-in') in times else None)
        share = job['setting']['burn_in'] if burn is not None else 0.0
        out.append(dict(row=row, label=job['label'], batch=job['batch'], accum=job['accum'],
                        window=job['norm'].get('window'),
                        held=windows_held(built[row, 'pooling'][1]),
                        held_burn_in=(windows_held(built[row, 'burn-in'][1])
                                      if (row, 'burn-in') in built else None),
                        images_per_step=job['images_per_step'], s_per_step=per_step,
                        s_per_step_all=times[row, 'pooling'], s_per_image_pooling=per_image,
                        s_per_image_burn_in=burn,
                        s_per_step_burn_in_all=times.get((row, 'burn-in')),
                        s_per_image=(1 - share) * per_image + share * (burn or 0.0)))
    ref = next((r for r in out if r['row'] == REFERENCE), None)
    for r in out:
        r['vs_gn_per_image'] = None if ref is None else r['s_per_image'] / ref['s_per_image']
    return out


def run_step_cost(setting: dict, rows: list[str], data_root: Path, out_dir: Path, meta: dict,
                  repeats: int, steps: int, log=print) -> dict:
    import torch
    from mmdet.utils import register_all_modules
    torch.set_num_threads(1)
    register_all_modules(init_default_scope=True)
    jobs = {row: make_job(row, setting, 0, data_root, out_dir / 'step_cost') for row in rows}
    t0 = time.perf_counter()
    run = dict(meta, setting=setting, rows=rows, repeats=repeats, steps=steps,
               results=measure(jobs, repeats, steps, log))
    run['wall_s'] = time.perf_counter() - t0
    (out_dir / STEP_COST_JSON).write_text(json.dumps(run, indent=1) + '\n')
    write_block(out_dir / DOC, STEP_COST_BEGIN, STEP_COST_END, render_step_cost(run), TITLE)
    return run


def render_step_cost(run: dict) -> str:
    s = run['setting']
    ref = next((r for r in run['results'] if r['row'] == REFERENCE), None)
    ms = lambda v: '-' if v is None else f'{v * 1e3:,.0f}'  # noqa: E731
    table = md_table(
        ('row', 'images x steps', 'k', 'window held', 'CPU ms per step (median)',
         'CPU ms per image, pooling', 'in burn-in', 'over a run', "x GN's over a run"),
        [(r['label'], f'{r["batch"]} x {r["accum"]}' if r['accum'] > 1 else r['batch'],
          r['window'] or '-', ', '.join(map(str, r['held'])) or '-', ms(r['s_per_step']),
          ms(r['s_per_image_pooling']), ms(r['s_per_image_burn_in']), ms(r['s_per_image']),
          '-' if r['vs_gn_per_image'] is None else f'{r["vs_gn_per_image"]:.2f}x')
         for r in run['results']])
    return '\n'.join([
        '',
        f'Generated by `{run["command"]}` on {run["when"]} ({run["wall_s"] / 60:.1f} min on '
        f'{run["machine"]}; load average {run["load_start"]} at the start).',
        '',
        f'Setting: {s["size"]} px canvases, width {s["width"]}, the study\'s training set '
        f'(data seed {s["data_seed"]}). Each row\'s model from the study\'s '
        'config, on the same training images, {steps} timed steps per row in each of '
        '{repeats} rounds, the rows taking turns within a round (one process, one torch '
        "thread; the process's CPU time). A CBN row is timed twice, by two models: one "
        'pooling its full window (filled before timing; "window held": past steps recorded '
        '+ the current one, after timing) and one in burn-in (its layers acting as BN); '
        '"over a run" weighs them by the run\'s steps, {burn:.0%} in burn-in.'
        .format(steps=run['steps'], repeats=run['repeats'], burn=s['burn_in'])
        + ('' if ref else ' GN was not measured: no ratios.'),
        '',
        table,
        '',
    ])
