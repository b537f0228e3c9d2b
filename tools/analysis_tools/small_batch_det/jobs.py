"""The study's jobs: a run of a row as plain json, and running them with the detection
studies' runner (``detection_runner``).

A job is everything one run needs (row, seed, batch, norm, setting, paths); ``run_one``
trains and validates it in this process with one torch thread; ``run_jobs`` runs jobs in
child processes of the command line (``--run-job``), a few at a time, costliest first.
"""
from __future__ import annotations

from pathlib import Path

import detection_runner
from detection_runner import load_average, loss_curve, make_recorder  # noqa: F401

from .configs import build_config
from .rows import ROWS, training_of

REPO = Path(__file__).resolve().parents[3]
# The command line a child process runs one job through.
COMMAND = REPO / 'tools' / 'analysis_tools' / 'small_batch_detection.py'


def make_job(row: str, setting: dict, seed: int, data_root: Path, work_root: Path,
             group: str = 'compare', window: int | None = None) -> dict:
    """Everything a run needs, as plain json (a child process gets it on its command line);
    ``window``: ``training_of``'s."""
    t = training_of(row, setting, window)
    return dict(group=group, row=row, label=ROWS[row]['label'], seed=seed, batch=t['batch'],
                accum=t['accum'], images_per_step=t['images_per_step'], setting=setting,
                norm=t['norm'], data_root=str(data_root),
                work_dir=str(work_root / f'{row}_b{t["batch"]}x{t["accum"]}_s{seed}'))


def run_one(job: dict, started: float | None = None) -> dict:
    """Train and validate one job in this process (one torch thread); return its result
    (``detection_runner.run_one`` with this study's config)."""
    return detection_runner.run_one(job, build_config, started)


def _cost(job: dict) -> float:
    return (job['setting']['images'] * (1.4 if job['norm']['kind'] == 'cbn' else 1.0)
            * (1.2 if job['batch'] == 1 else 1.0))


def run_jobs(jobs: list[dict], workers: int, log=print, reuse: bool = False,
             recorded: list[tuple[str, list[dict]]] = (), costliest_first: bool = True,
             on_result=None) -> list[dict]:
    """Run the jobs, ``workers`` child processes of the study's command line at a time (0:
    in this process), costliest first (two workers finish together) or as given. With
    ``reuse``, a job whose finished result is already in its work dir, or in ``recorded``
    (results jsons: the committed comparison), is not run again. Returns the results in
    the jobs' order (``detection_runner.run_jobs``)."""
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i])) if costliest_first \
        else None
    # run_one looked up here at call time: a test may replace it
    return detection_runner.run_jobs(jobs, workers, command=COMMAND,
                                     in_process=lambda job: run_one(job), log=log,
                                     reuse=reuse, recorded=recorded, start_order=order,
                                     on_result=on_result)
