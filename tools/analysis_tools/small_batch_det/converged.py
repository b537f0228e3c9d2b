"""The converged comparison: the study's rows trained at several budgets (images seen), each
with its own schedule, reported at equal images and against compute.

Every budget is a setting of its own (``images``): warm-up, CBN burn-in and the lr steps
stay the same fractions of its iterations (``configs.build_config``). Jobs run in the order
they are planned, the most informative first: the ``first`` rows (GN and CBN) at every
budget, then the other rows; each part budget by budget as given, seed by seed, row by row.
Each finished run is added to ``small_batch_detection_converged.json`` as it finishes, so an
interrupted study keeps what it ran and ``--reuse`` resumes it; the 2,400-image rows of the
committed comparison (``small_batch_detection.json``) are the same jobs and are reused from
it.

Against compute, a row is the curve of (mean CPU per run, mean mAP) through its budgets;
the CPU it needs to reach GN's best mAP is read off that curve, linearly between budgets.

Runs may come from more than one machine (the study spans sessions): the json's
``machines`` names them (label -> description; a result without ``machine`` ran on the
first), and ``reruns`` holds jobs of ``results`` trained again on another machine, which
measure how the machines compare (the same floats? how many CPU seconds?). A rerun is
never pooled with the seeds.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from detection_runner import header, recorded_results, reuse_note
from study_markdown import md_table, write_block

from .goals import summarise
from .jobs import load_average, make_job, run_jobs
from .report import DOC, RESULTS_JSON, TITLE, fmt
from .rows import ROWS, distinct_rows, setting_name
from .step_cost import STEP_COST_JSON

CONVERGED_JSON = 'small_batch_detection_converged.json'
CONVERGED_PLOT = 'small_batch_detection_converged.png'
CONVERGED_BEGIN = ('<!-- small-batch-det-converged:begin (written by '
                   'tools/analysis_tools/small_batch_detection.py --converged; do not edit) -->')
CONVERGED_END = '<!-- small-batch-det-converged:end -->'
# The rows in the order they run at each budget and seed: GN and CBN (the question) first.
# 'bn-large' is BN at 4 images per step in the default setting (large batch 4): the
# committed comparison's row of that name, so its 2,400-image runs are reused.
CONVERGED_ROWS = ['gn', 'cbn', 'bn', 'bn-large', 'cbn-k8', 'cbn-accum']
# The rows whose runs start first, at every budget: whether CBN's lead over GN survives
# longer training is the study's question; the other rows place the two.
FIRST_ROWS = ['gn', 'cbn']
BUDGETS = [2400, 6000, 15000]
REFERENCE = 'gn'  # the row whose best mAP the compute table asks the others to reach


def plan(setting: dict, budgets: list[int], rows: list[str], seeds: list[int], data_root: Path,
         work_root: Path, window: int | None = None, first: list[str] = ()) -> list[dict]:
    """Every run of the study in the order it starts: the ``first`` rows' runs at every
    budget, then the others'; each part budget by budget (as given), seed by seed, row by
    row. Each budget's runs go under ``work_root/<images>img``."""
    jobs = [make_job(row, dict(setting, images=images), seed, data_root,
                     work_root / f'{images}img', group='converged', window=window)
            for images in budgets for seed in seeds for row in rows]
    return sorted(jobs, key=lambda job: job['row'] not in first)  # stable: keeps the order


def run_converged(setting: dict, budgets: list[int], rows: list[str], seeds: list[int],
                  data_root: Path, work_dir: Path, out_dir: Path, workers: int, reuse: bool,
                  window: int | None, meta: dict, log=print, first: list[str] = ()) -> dict:
    """Train what is missing of the plan (one at a time with ``workers`` 1), write the json
    after every finished run, and the doc block and figure at the end."""
    rows, repeats = distinct_rows(rows, setting, window)
    for row, same in repeats.items():
        log(f'row {row!r} trains the same runs as {same!r} in this setting: run once')
    jobs = plan(setting, budgets, rows, seeds, data_root, work_dir / 'converged', window, first)
    t0 = time.perf_counter()
    recorded = recorded_results([out_dir / CONVERGED_JSON, out_dir / RESULTS_JSON]) \
        if reuse else []
    finished: dict[int, dict] = {}
    run = dict(meta, setting=setting, budgets=budgets, rows=rows, seeds=seeds, workers=workers,
               jobs=jobs)
    previous = out_dir / CONVERGED_JSON
    if reuse and previous.exists():  # which machine ran the reused runs, and the reruns
        kept = json.loads(previous.read_text())
        run.update({key: kept[key] for key in ('machines', 'reruns') if key in kept})

    def save(job, result):
        finished[jobs.index(job)] = result
        run.update(wall_s=time.perf_counter() - t0, load_end=load_average(),
                   results=[finished[i] for i in sorted(finished)])
        (out_dir / CONVERGED_JSON).write_text(json.dumps(run, indent=1, default=float) + '\n')

    log(f'{len(jobs)} runs planned, {workers} at a time, in this order: '
        + ', '.join(f'{j["row"]} {j["setting"]["images"]} s{j["seed"]}' for j in jobs))
    run_jobs(jobs, workers, log=log, reuse=reuse, recorded=recorded, costliest_first=False,
             on_result=save)
    publish_converged(run, out_dir)
    return run


def publish_converged(run: dict, out_dir: Path) -> None:
    plot_converged(run, out_dir / CONVERGED_PLOT)
    write_block(out_dir / DOC, CONVERGED_BEGIN, CONVERGED_END,
                render_converged(run, step_cost_of(out_dir)), TITLE)


# ----------------------------------------------------------------------------- numbers


def by_budget(run: dict) -> dict[int, list[dict]]:
    """``summarise``'s rows at each budget (ascending), in the study's row order."""
    rows = [r for r in ROWS if r in run['rows']]
    return {images: summarise([r for r in run['results']
                               if r['job']['setting']['images'] == images], rows)
            for images in sorted(run['budgets'])}


def curves(run: dict, per_image: dict[str, float] | None = None) -> dict[str, list[dict]]:
    """Each row's points through its budgets, ascending: images, mean CPU and mean mAP over
    its finished seeds, and how many finished. ``per_image`` (row -> CPU seconds per
    training image, measured side by side): the CPU of a point is its images times that
    instead of its runs' own, and rows without one are left out."""
    out: dict[str, list[dict]] = {}
    for images, summary in by_budget(run).items():
        for s in summary:
            if s['finished'] and (per_image is None or s['row'] in per_image):
                cpu = s['cpu_s'] if per_image is None else images * per_image[s['row']]
                out.setdefault(s['row'], []).append(dict(
                    images=images, cpu_s=cpu, mAP=s['mAP'], seeds=s['finished']))
    return out


def step_cost_of(out_dir: Path) -> dict | None:
    """The step-cost run saved in ``out_dir`` (``--step-cost``), None if there is none."""
    path = out_dir / STEP_COST_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def cpu_to_reach(points: list[dict], target: float) -> tuple[float | None, str]:
    """The CPU per run at which a row's curve first reaches ``target`` mAP, linear in CPU
    between the two budgets around the crossing: (CPU, 'interpolated'); (CPU of the smallest
    budget, 'at most') where that budget already reaches it; (None, 'not reached')."""
    for i, p in enumerate(points):
        if p['mAP'] >= target:
            if i == 0:
                return p['cpu_s'], 'at most'
            q = points[i - 1]
            share = (target - q['mAP']) / (p['mAP'] - q['mAP'])
            return q['cpu_s'] + share * (p['cpu_s'] - q['cpu_s']), 'interpolated'
    return None, 'not reached'


def compute_table(run: dict, per_image: dict[str, float] | None = None
                  ) -> tuple[str, float | None]:
    """Per row: its best mean mAP, and the CPU per run it needs to reach the reference's
    (GN's) best, against the reference's own; and that best (None: GN not run yet).
    ``per_image``: the CPU of a run is its images times the row's (``curves``)."""
    lines = curves(run, per_image)
    reference = lines.get(REFERENCE)
    if not reference:
        return '', None
    best = max(p['mAP'] for p in reference)
    gn_cpu, _ = cpu_to_reach(reference, best)
    table = []
    for row in [r for r in ROWS if r in lines]:
        points = lines[row]
        top = max(points, key=lambda p: p['mAP'])
        cpu, how = cpu_to_reach(points, best)
        if cpu is None:
            reach, ratio = 'not reached', '-'
        else:
            reach = ('at most ' if how == 'at most' else '') + f'{cpu:,.0f} s'
            ratio = f'{cpu / gn_cpu:.2f}x'
        table.append((ROWS[row]['label'], ', '.join(f'{p["images"]:,}' for p in points),
                      f'{fmt(top["mAP"])} ({top["images"]:,} images, {top["cpu_s"]:,.0f} s)',
                      reach, ratio))
    head = ('row', 'budgets run (images)', 'best mAP (at images, CPU per run)',
            f"CPU per run to reach GN's best, {fmt(best)}", "x GN's CPU")
    return md_table(head, table), best


def machine_of(result: dict, run: dict) -> str:
    """The label of the machine a result (or a ``per_seed`` entry) ran on."""
    return result.get('machine') or next(iter(run.get('machines') or {'A': ''}))


def machines_note(run: dict) -> list[str]:
    """Which machine ran what, and the reruns that compare them; nothing for one machine."""
    machines = run.get('machines') or {}
    if len(machines) < 2:
        return []
    first = next(iter(machines))
    lines = ['**Machines.** ' + '; '.join(f'{label}: {text}' for label, text in machines.items())
             + f'. A run from a machine other than {first} is marked with its label in the '
             "table above; CPU figures are each machine's own."]
    key = lambda r: json.dumps(r['job'], sort_keys=True)  # noqa: E731
    originals = {key(r): r for r in run['results']}
    for again in run.get('reruns', []):
        before = originals.get(key(again))
        if before is None:
            continue
        a, b = machine_of(before, run), machine_of(again, run)
        j = again['job']
        same = (before['mAP'], before['final_loss']) == (again['mAP'], again['final_loss'])
        lines.append(
            f'- The same job on {a} and {b}: {j["label"]}, {j["setting"]["images"]:,} images, '
            f'seed {j["seed"]}: mAP {fmt(before["mAP"])} and {fmt(again["mAP"])}, final '
            f'training loss {before["final_loss"]:.6f} and {again["final_loss"]:.6f} '
            f'({"the same floats" if same else "not the same floats"}); CPU '
            f'{before["cpu_s"]:,.0f} s and {again["cpu_s"]:,.0f} s '
            f'({again["cpu_s"] / before["cpu_s"]:.2f}x on {b}).')
    return lines + ['']


def equal_images_table(run: dict) -> str:
    several = len(run.get('machines') or {}) > 1
    first = machine_of({}, run)

    def cpu(p):  # a run from another machine than the first carries its label
        where = machine_of(p, run)
        return f'{p["cpu_s"]:,.0f} s' + (f', {where}' if several and where != first else '')
    table = []
    for images, summary in by_budget(run).items():
        gn = next((s for s in summary if s['row'] == REFERENCE and s['finished']), None)
        for s in summary:
            if not s['finished']:
                continue
            per_seed = ', '.join(f'{fmt(p["mAP"])} ({cpu(p)})' for p in s['per_seed'])
            versus = (f'{(s["mAP"] - gn["mAP"]) * 100:+.1f}' if gn and s['row'] != REFERENCE
                      else '-')
            table.append((f'{images:,}', s['label'],
                          f'{s["batch"]} x {s["accum"]}' if s['accum'] > 1 else s['batch'],
                          s['window'] or '-', s['iters'], per_seed, fmt(s['mAP']),
                          fmt(s['mAP_spread']) if s['finished'] > 1 else '-', versus,
                          f'{s["final_loss"]:.3f}', f'{s["cpu_s"]:,.0f} s'))
    # The training loss beside the val mAP: a row that fits the training canvases as well
    # as another but validates lower loses at inference or in generalisation, not in fit.
    return md_table(('images seen', 'row', 'images x steps', 'k', 'iterations',
                     'mAP per seed (CPU)', 'mAP', 'spread', 'vs GN (points)',
                     'final training loss', 'CPU per run'), table)


def queued(run: dict) -> list[str]:
    """The planned runs without a finished result, a line per budget and row, in the order
    they start (a row's seeds alternate with the budget's other first rows)."""
    done = {json.dumps(r['job'], sort_keys=True) for r in run['results']
            if r['status'] == 'ok'}
    missing: dict[tuple[int, str], list[int]] = {}
    for job in run['jobs']:
        if json.dumps(job, sort_keys=True) not in done:
            missing.setdefault((job['setting']['images'], job['label']), []).append(job['seed'])
    return [f'- {images:,} images: {label} seed{"s" if len(seeds) > 1 else ""} '
            f'{", ".join(map(str, seeds))}' for (images, label), seeds in missing.items()]


def reference_at(points: list[dict], cpu: float) -> tuple[float | None, str]:
    """The reference's mean mAP at ``cpu`` off its curve: linear in CPU between its two
    budgets around it ('interpolated'); its longest budget's where ``cpu`` is past it
    ('at least': more CPU would train it further); None below its smallest budget."""
    if cpu < points[0]['cpu_s']:
        return None, 'below'
    for q, p in zip(points, points[1:]):
        if cpu <= p['cpu_s']:
            share = (cpu - q['cpu_s']) / (p['cpu_s'] - q['cpu_s'])
            return q['mAP'] + share * (p['mAP'] - q['mAP']), 'interpolated'
    return points[-1]['mAP'], 'at least'


def equal_compute_table(lines: dict[str, list[dict]]) -> str:
    """Every run of every row against GN at the same CPU per run (``reference_at``)."""
    reference = lines[REFERENCE]
    table = []
    for row in [r for r in ROWS if r in lines and r != REFERENCE]:
        cells = []
        for p in lines[row]:
            gn, how = reference_at(reference, p['cpu_s'])
            cells.append(f'{p["images"]:,}: {fmt(p["mAP"])} at {p["cpu_s"]:,.0f} s, GN '
                         + ('not run that low' if gn is None else
                            f'{"at least " if how == "at least" else ""}{fmt(gn)} '
                            f'({(p["mAP"] - gn) * 100:+.1f})'))
        table.append((ROWS[row]['label'], '; '.join(cells)))
    return md_table(('row', 'each budget: its mAP at its CPU per run, GN at that CPU '
                     '(row minus GN, points)'), table)


def step_cost_part(run: dict, step_cost: dict | None) -> list[str]:
    """The compute table again, with each run's CPU from the rows' CPU per training image
    measured side by side (``step_cost``: a ``--step-cost`` run), not from its own run."""
    if step_cost is None:
        return []
    per_image = {r['row']: r['s_per_image'] for r in step_cost['results']}
    table, best = compute_table(run, per_image)
    if best is None:
        return []
    return [
        "**Against compute, at the step costs measured side by side** (`"
        f"{step_cost['command']}`, its block below): a run's CPU is its images times the "
        "row's CPU per training image there, measured with every row under one load; the "
        "runs' own CPU above depends on what else the machine ran and on the machine. Rows "
        "it did not measure are left out; read as above.",
        '',
        table,
        '',
        '**At equal compute**, at the same step costs: each run against GN\'s curve at the '
        'same CPU per run (linear in CPU between GN\'s budgets; past GN\'s longest budget, '
        'that budget\'s mAP, a bound GN would pass with more images).',
        '',
        equal_compute_table(curves(run, per_image)),
        '']


def render_converged(run: dict, step_cost: dict | None = None) -> str:
    s = run['setting']
    budgets = sorted(run['budgets'])
    ok = [r for r in run['results'] if r['status'] == 'ok']
    runs = (f'{len(ok)} of the {len(run["jobs"])} planned runs finished'
            f'{reuse_note(run["results"])}')
    table, best = compute_table(run)
    left = queued(run)
    failed = [f'{r["job"]["label"]} {r["job"]["setting"]["images"]:,} images seed '
              f'{r["job"]["seed"]}: {r["status"]}' for r in run['results'] if r['status'] != 'ok']
    return '\n'.join([
        *header(run, setting_name(dict(s, images='/'.join(map(str, budgets)))),
                f'Budgets (images seen by every run): {", ".join(f"{b:,}" for b in budgets)}, '
                'each its own schedule (the fractions above of its iterations). mAP: COCO box '
                f'AP on the {s["num_val"]} val canvases (unseen digits), mean over the seeds '
                'finished; spread: max - min over seeds; final training loss: the mean loss '
                'of the last 10 % of iterations (training mode), mean over seeds; CPU per '
                'run: the training process\'s CPU time (one torch thread), mean over seeds.',
                runs=runs),
        '',
        '**At equal images** (per budget; "vs GN": the row\'s mean minus GN\'s at the same '
        'budget):',
        '',
        equal_images_table(run),
        '',
        *machines_note(run),
        '**Against compute**: the CPU per run each row needs to reach GN\'s best mean mAP '
        'over the budgets run so far, read off its curve through its budgets (linear in CPU '
        'between the two budgets around the crossing; "at most": its smallest budget '
        'already reaches it; "not reached": no budget run so far does).',
        '',
        table if best is not None else 'GN has no finished run yet.',
        '',
        *step_cost_part(run, step_cost),
        f'![mAP against CPU per run]({CONVERGED_PLOT})',
        '',
        *(['Failed runs: ' + '; '.join(failed) + '.', ''] if failed else []),
        *(['**Not run yet** (queued, in the order they start):', '', *left, '']
          if left else ['Every planned run has finished.', '']),
    ])


# ----------------------------------------------------------------------------- figure


def plot_converged(run: dict, path: Path) -> None:
    """mAP against CPU seconds per run: every row a curve through its budgets (means),
    each seed a dot, GN's best as a line."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    lines = curves(run)
    for n, row in enumerate(r for r in ROWS if r in lines):
        points, colour = lines[row], f'C{n % 10}'
        ax.plot([p['cpu_s'] for p in points], [p['mAP'] for p in points], '-o', color=colour,
                label=ROWS[row]['label'], markersize=5)
        for p in points:
            ax.annotate(f'{p["images"]:,}', (p['cpu_s'], p['mAP']), fontsize=6, xytext=(3, 3),
                        textcoords='offset points', color=colour)
        seeds = [r for r in run['results'] if r['job']['row'] == row and r['status'] == 'ok'
                 and math.isfinite(r['mAP'])]
        ax.plot([r['cpu_s'] for r in seeds], [r['mAP'] for r in seeds], '.', color=colour,
                markersize=3)
    _, best = compute_table(run)
    if best is not None:
        ax.axhline(best, color='k', linestyle='--', linewidth=0.8, label="GN's best mean")
    ax.set_xscale('log')
    ax.set_xlabel('CPU seconds per run (one torch thread; labels: images seen)')
    ax.set_ylabel('COCO box AP on val (line: mean; dots: seeds)')
    st = run['setting']
    ax.set_title(f'Faster R-CNN from scratch, every norm layer swapped, digits {st["size"]} px, '
                 f'width {st["width"]}: accuracy against compute', fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
