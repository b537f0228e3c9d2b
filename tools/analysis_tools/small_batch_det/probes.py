"""BN-only probes: BN at several batches in one setting, to choose the comparison's setting
(a large batch that BN trains well at within the budget, small ones where it fails).

Every probe run so far is kept in ``small_batch_detection_probes.json``; a rerun of the same
setting, batch and seed replaces its entry.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from detection_runner import merge_probes
from study_markdown import write_block

from .jobs import load_average, make_job, run_jobs
from .report import DOC, PROBE_BEGIN, PROBE_END, PROBES_JSON, TITLE, probe_table, render_probes


def run_probes(setting: dict, batches: list[int], seeds: list[int], data_root: Path,
               work_dir: Path, out_dir: Path, workers: int, reuse: bool, meta: dict) -> dict:
    """Train BN at each of ``batches`` and seed; add the runs to the probes json and its
    block of the doc; return everything saved."""
    setting = dict(setting, small=None)  # probes: any batches, compared with the large one's
    digest = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]
    jobs = [make_job('bn', dict(setting, small=b), seed, data_root, work_dir / 'probes' / digest,
                     group='probe')
            for b in batches for seed in seeds]
    results = run_jobs(jobs, workers, log=lambda s: print(s, flush=True), reuse=reuse)
    fresh = [dict(setting=setting, batch=r['job']['batch'], seed=r['job']['seed'], mAP=r['mAP'],
                  mAP50=r['mAP50'], mAP75=r['mAP75'], final_loss=r['final_loss'],
                  iters=r['iters'], lr=r['lr'], train_s=r['train_s'], val_s=r['val_s'],
                  wall_s=r['wall_s'], cpu_s=r.get('cpu_s', float('nan')), status=r['status'],
                  workers=workers, **meta, load_end=r.get('load_end', load_average()))
             for r in results]
    saved = merge_probes(out_dir / PROBES_JSON, fresh, ('batch', 'seed'))
    write_block(out_dir / DOC, PROBE_BEGIN, PROBE_END, render_probes(saved), TITLE)
    print(probe_table([e for e in saved['probes'] if e['setting'] == setting]))
    return saved
