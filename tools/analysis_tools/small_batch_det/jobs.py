"""The job pool: a run of a row as plain json, training it, and running many of them.

A job is everything one run needs (row, seed, batch, norm, setting, paths); ``run_one``
trains and validates it in this process with one torch thread; ``run_jobs`` runs jobs in
child processes of the command line (``--run-job``), a few at a time, costliest first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .configs import build_config
from .rows import ROWS, training_of

REPO = Path(__file__).resolve().parents[3]
# The command line a child process runs one job through.
COMMAND = REPO / 'tools' / 'analysis_tools' / 'small_batch_detection.py'


def load_average() -> str:
    return ' '.join(f'{v:.2f}' for v in os.getloadavg())


def make_job(row: str, setting: dict, seed: int, data_root: Path, work_root: Path,
             group: str = 'compare', window: int | None = None) -> dict:
    """Everything a run needs, as plain json (a child process gets it on its command line);
    ``window``: ``training_of``'s."""
    t = training_of(row, setting, window)
    return dict(group=group, row=row, label=ROWS[row]['label'], seed=seed, batch=t['batch'],
                accum=t['accum'], images_per_step=t['images_per_step'], setting=setting,
                norm=t['norm'], data_root=str(data_root),
                work_dir=str(work_root / f'{row}_b{t["batch"]}x{t["accum"]}_s{seed}'))


def make_recorder():
    from mmengine.hooks import Hook

    class Recorder(Hook):
        """Training loss per iteration, the val metrics, and when validation began."""
        priority = 'LOWEST'

        def __init__(self):
            self.losses, self.metrics, self.val_start = [], {}, None

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if outputs and 'loss' in outputs:
                self.losses.append(float(outputs['loss'].detach()))

        def before_val(self, runner):
            self.val_start = time.perf_counter()

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = dict(metrics or {})

    return Recorder()


def loss_curve(losses: list[float], points: int = 40) -> list[float]:
    """Mean loss over ``points`` equal spans of training (images seen)."""
    if not losses:
        return []
    n = len(losses)
    edges = [round(i * n / points) for i in range(points + 1)]
    return [sum(losses[a:b]) / (b - a) for a, b in zip(edges, edges[1:]) if b > a]


def _cpu_seconds() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(job: dict, started: float | None = None) -> dict:
    """Train and validate one job in this process (one torch thread); return its result.

    ``wall_s`` depends on what else the machine runs; ``cpu_s`` (this process's CPU time
    over the same span, one thread) is the cost on an idle core."""
    start = started or time.perf_counter()
    cpu_start = 0.0 if started else _cpu_seconds()
    import torch
    torch.set_num_threads(1)
    import cbn_plugin  # noqa: F401  (registers CBN and CBNHook)
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner
    register_all_modules(init_default_scope=False)
    cfg = build_config(job)
    runner = Runner.from_cfg(cfg)
    recorder = make_recorder()
    runner.register_hook(recorder, priority='LOWEST')
    train_start = time.perf_counter()
    status = 'ok'
    try:
        runner.train()  # validates after the last iteration (val_interval = max_iters)
    except Exception as exc:  # a diverged or crashed run is a result too
        status = f'{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ""}'
    end = time.perf_counter()
    m, losses = recorder.metrics, recorder.losses
    # What the CBN layers did: optimizer steps counted, the window they hold at the end
    # (past steps recorded + the current one) and the window they pool once full.
    layers = [layer for _, layer in cbn_plugin.cbn_layers(runner.model)]
    cbn = dict(layers=len(layers), steps=sorted({layer.steps_done for layer in layers}),
               window=sorted({int(layer.window_filled.max()) + 1 for layer in layers}),
               window_size=sorted({layer.window_size for layer in layers})) \
        if layers else None
    val_start = recorder.val_start or end
    tail = losses[-max(1, len(losses) // 10):]
    nan = float('nan')
    return dict(job=job, status=status if m or status != 'ok' else 'no val metrics',
                mAP=m.get('coco/bbox_mAP', nan), mAP50=m.get('coco/bbox_mAP_50', nan),
                mAP75=m.get('coco/bbox_mAP_75', nan),
                final_loss=sum(tail) / len(tail) if tail else nan,
                loss_curve=loss_curve(losses), iters=cfg.train_cfg.max_iters,
                lr=cfg.optim_wrapper.optimizer.lr,
                train_s=val_start - train_start, val_s=end - val_start, wall_s=end - start,
                cpu_s=_cpu_seconds() - cpu_start, load_end=load_average(), cbn=cbn)


def _child_env() -> dict:
    env = dict(os.environ)
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
        env[var] = '1'
    return env


def _cost(job: dict) -> float:
    return (job['setting']['images'] * (1.4 if job['norm']['kind'] == 'cbn' else 1.0)
            * (1.2 if job['batch'] == 1 else 1.0))


def _saved_result(job: dict) -> dict | None:
    """The result an earlier run of exactly this job left in its work dir, if any."""
    out = Path(job['work_dir']) / 'result.json'
    if out.is_file():
        result = json.loads(out.read_text())
        if result.get('job') == job and result.get('status') == 'ok':
            return result
    return None


def run_jobs(jobs: list[dict], workers: int, log=print, reuse: bool = False,
             recorded: tuple[Path, list[dict]] | None = None) -> list[dict]:
    """Run the jobs (costliest first), ``workers`` child processes at a time (0: in this
    process). With ``reuse``, a job whose finished result is already in its work dir, or
    in ``recorded`` (a results json and its results: the committed comparison), is not
    run again. Returns the results in the jobs' order."""
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    results: dict[int, dict] = {}
    if reuse:
        source, earlier = recorded or (None, [])
        for i in order:
            saved = _saved_result(jobs[i])
            if saved is not None:
                results[i] = dict(saved, reused_from=saved.get('reused_from') or 'its work dir')
                log(f'reusing {jobs[i]["work_dir"]}/result.json')
                continue
            saved = next((r for r in earlier
                          if r.get('job') == jobs[i] and r.get('status') == 'ok'), None)
            if saved is not None:
                # a result the json had reused keeps where it came from
                results[i] = dict(saved, reused_from=saved.get('reused_from') or str(source))
                log(f'reusing {jobs[i]["row"]} seed {jobs[i]["seed"]} from {source}')
        order = [i for i in order if i not in results]
    start = time.perf_counter()

    def report(i):
        r = results[i]
        j = r['job']
        log(f'[{len(results)}/{len(jobs)} {time.perf_counter() - start:5.0f}s] {j["label"]:38s} '
            f'{j["batch"]}x{j["accum"]} seed {j["seed"]}: mAP {r["mAP"]:.3f} mAP50 '
            f'{r["mAP50"]:.3f} loss {r["final_loss"]:.3f} {r["wall_s"]:.0f}s '
            f'({r["iters"]} it) {r["status"]}')

    if workers <= 0:
        for i in order:
            results[i] = run_one(jobs[i])
            Path(jobs[i]['work_dir']).mkdir(parents=True, exist_ok=True)
            (Path(jobs[i]['work_dir']) / 'result.json').write_text(
                json.dumps(results[i], default=float) + '\n')
            report(i)
        return [results[i] for i in range(len(jobs))]
    pending, running = list(order), {}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            job = jobs[i]
            Path(job['work_dir']).mkdir(parents=True, exist_ok=True)
            out = Path(job['work_dir']) / 'result.json'
            if out.exists():
                out.unlink()
            log_file = open(Path(job['work_dir']) / 'run.log', 'w')
            proc = subprocess.Popen(
                [sys.executable, str(COMMAND), '--run-job', json.dumps(job),
                 '--result', str(out)], stdout=log_file, stderr=subprocess.STDOUT,
                env=_child_env(), cwd=str(REPO))
            running[i] = (proc, log_file, out, time.perf_counter())
        time.sleep(1.0)
        for i, (proc, log_file, out, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log_file.close()
            del running[i]
            if out.is_file():
                results[i] = json.loads(out.read_text())
            else:
                nan = float('nan')
                results[i] = dict(job=jobs[i], status=f'child exit {proc.returncode} (see '
                                  f'{log_file.name})', mAP=nan, mAP50=nan, mAP75=nan,
                                  final_loss=nan, loss_curve=[], iters=0, lr=nan, train_s=nan,
                                  val_s=nan, wall_s=time.perf_counter() - t0, cpu_s=nan,
                                  load_end=load_average())
            report(i)
    return [results[i] for i in range(len(jobs))]
