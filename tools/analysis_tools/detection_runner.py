"""What the detection studies share: their job runner, argument block and report header.

``small_batch_detection.py`` (its package ``small_batch_det/``: the from-scratch comparison,
its probes and the converged comparison) and ``pretrained_detection.py`` train the same
digits detector, one run a job. A job is plain json (row, seed, batch, norm, setting,
paths); a study gives its own config builder, and this module

- trains one job in this process with one torch thread (``run_one``): the loss curve, the
  val metrics, what the CBN layers did, wall and CPU time;
- runs many jobs in child processes of the study's own command line (``--run-job``), a few
  at a time (``run_jobs``), keeping the finished result of every identical job with
  ``reuse`` (from its work dir or from a results json), so that an interrupted study
  resumes and a change reruns only the runs it touches;
- gives the command-line options every study takes (``add_study_args``, ``parse_study_args``)
  and the two lines that open a generated report (``header``), and re-renders a page from
  its jsons (``rerender``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from study_markdown import write_block

REPO = Path(__file__).resolve().parents[2]
IMPORTED = time.perf_counter()  # a child process's start, for its wall time

# --tiny: a data set and a detector that train in seconds (options given still win)
TINY = dict(size=64, num_train=8, num_val=4, images=8, width=8, seeds=[0], large=4)

# The help of the setting's options (``rows.SETTING_DEFAULTS``' names); a study's own
# setting keys get none.
SETTING_HELP = dict(
    size='canvas px', digits='digits per canvas, min max',
    digit_px='digit height in px, min max (default: 16-40 scaled by size/128)',
    clutter='distractors per canvas, min max',
    width='backbone base channels (FPN and box head: 2x, fc: 8x)',
    images='training images seen by every run',
    lr_per_image='lr = this x images per optimizer step',
    warmup='linear warm-up, fraction of the iterations',
    burn_in='CBN burn-in (plain BN), fraction of the iterations',
    large='large reference batch (images per step)',
    small='the small batch of the comparison rows')


# ----------------------------------------------------------------------------- arguments


def study_parser(doc: str) -> argparse.ArgumentParser:
    """A study's parser: its docstring's first paragraph as the description, the rest (the
    commands) as the epilog."""
    return argparse.ArgumentParser(description=doc.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=doc.split('\n\n', 1)[1])


def add_study_args(ap: argparse.ArgumentParser, setting_defaults: dict, *, work_dir: Path,
                   workers: int, several: Iterable[str] = ()) -> argparse._ArgumentGroup:
    """The options every detection study takes: seeds, window, workers, reuse, tiny,
    from-json, where things go, and one option per key of ``setting_defaults`` (list values
    take two numbers; a key in ``several`` takes one or more, default None: the study
    resolves it). Returns the setting group."""
    options = [
        ('--seeds', dict(type=int, nargs='+', default=[0, 1])),
        ('--out-dir', dict(type=Path, default=REPO / 'docs')),
        ('--data-root', dict(type=Path, default=REPO / 'data' / 'small_batch_det')),
        ('--work-dir', dict(type=Path, default=work_dir)),
        ('--window', dict(type=int, default=None, help='every CBN row without a fixed window '
                          'pools this many steps (default: the window CBNHook derives, '
                          'cbn_plugin.derived_window_size: 32 images)')),
        ('--workers', dict(type=int, default=workers, help='child processes at a time, one '
                           'torch thread each; 0: in this process')),
        ('--reuse', dict(action='store_true', help='keep the finished results of identical '
                         'jobs, from their work dirs or from the results json in --out-dir '
                         '(resume an interrupted study; rerun only the runs a change touches)')),
        ('--tiny', dict(action='store_true', help='a tiny data set and a few iterations: the '
                        'pipeline in seconds')),
        ('--from-json', dict(action='store_true', help='no training: re-render the md and the '
                             'plots from the jsons in --out-dir'))]
    for flag, kwargs in options:
        ap.add_argument(flag, **kwargs)
    ap.add_argument('--run-job', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--result', default=None, help=argparse.SUPPRESS)
    g = ap.add_argument_group('setting')
    for key, value in setting_defaults.items():
        flag, help_ = '--' + key.replace('_', '-'), SETTING_HELP.get(key)
        if key in several:  # None: the study's default
            g.add_argument(flag, type=type(value), nargs='+', default=None, help=help_)
        elif key == 'digit_px':
            g.add_argument(flag, type=int, nargs=2, default=None, help=help_)
        elif isinstance(value, list):
            g.add_argument(flag, type=int, nargs=2, default=value, help=help_)
        else:
            g.add_argument(flag, type=type(value), default=value, help=help_)
    return g


def parse_study_args(ap: argparse.ArgumentParser, argv=None, tiny: dict | None = None):
    """Parse; with ``--tiny`` parse again on ``TINY`` defaults (and ``tiny``'s), so that
    options given on the command line still win. Refuses a window under one step; makes
    ``--out-dir``."""
    args = ap.parse_args(argv)
    if args.tiny:
        ap.set_defaults(**dict(TINY, **(tiny or {})))
        args = ap.parse_args(argv)
    if args.window is not None and args.window < 1:
        raise SystemExit(f'--window {args.window}: a CBN window_size is an integer >= 1 '
                         '(1 is plain BN)')
    if not args.run_job:  # where the study writes its jsons, md and plots
        args.out_dir.mkdir(parents=True, exist_ok=True)
    return args


# ----------------------------------------------------------------------------- one run


def load_average() -> str:
    return ' '.join(f'{v:.2f}' for v in os.getloadavg())


def cpu_seconds() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def meta(tool: str, argv=None) -> dict:
    """The command, time (UTC), machine and load a study's json starts with."""
    import platform

    import torch
    args = sys.argv[1:] if argv is None else list(argv)
    return dict(command=' '.join(['python', tool] + args),
                when=time.strftime('%Y-%m-%d %H:%M', time.gmtime()),
                machine=f'{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}',
                load_start=load_average())


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


def run_one(job: dict, build_config: Callable, started: float | None = None,
            hooks: Iterable = ()) -> dict:
    """Train and validate one job in this process (one torch thread); return its result.

    ``build_config(job)``: the study's mmengine config of the job; ``hooks``: (hook,
    priority) pairs the study registers besides the recorder. ``wall_s`` depends on what
    else the machine runs; ``cpu_s`` (this process's CPU time over the same span, one
    thread: the whole process when ``started``, a child's start, is given) is the cost on
    an idle core."""
    start = started or time.perf_counter()
    cpu_start = 0.0 if started else cpu_seconds()
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
    for hook, priority in hooks:
        runner.register_hook(hook, priority=priority)
    train_start = time.perf_counter()
    status = 'ok'
    try:
        runner.train()  # validates after the last iteration (val_interval = max_iters)
    except Exception as exc:  # a diverged or crashed run is a result too
        status = f'{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ""}'
    end = time.perf_counter()
    m, losses = recorder.metrics, recorder.losses
    # What the CBN layers did: optimizer steps counted, the window they hold at the end
    # (past steps recorded + the current one; a frozen layer that never trained holds
    # none) and the window they pool once full.
    layers = [layer for _, layer in cbn_plugin.cbn_layers(runner.model)]
    cbn = dict(layers=len(layers), steps=sorted({layer.steps_done for layer in layers}),
               window=sorted({int(layer.window_filled.max()) + 1 for layer in layers
                              if layer.window_filled is not None}),
               window_size=sorted({layer.window_size for layer in layers})) \
        if layers else None
    val_start = recorder.val_start or end
    tail = losses[-max(1, len(losses) // 10):]
    from host_overhead import layer_state  # the code that trained: commit, local changes
    nan = float('nan')
    return dict(job=job, status=status if m or status != 'ok' else 'no val metrics',
                mAP=m.get('coco/bbox_mAP', nan), mAP50=m.get('coco/bbox_mAP_50', nan),
                mAP75=m.get('coco/bbox_mAP_75', nan),
                final_loss=sum(tail) / len(tail) if tail else nan,
                loss_curve=loss_curve(losses), iters=cfg.train_cfg.max_iters,
                lr=cfg.optim_wrapper.optimizer.lr,
                train_s=val_start - train_start, val_s=end - val_start, wall_s=end - start,
                cpu_s=cpu_seconds() - cpu_start, load_end=load_average(), cbn=cbn,
                code=layer_state())


def run_child(args, run_one_job: Callable) -> dict:
    """A study's ``--run-job`` process: train the job, write its result to ``--result``
    (its wall time from when this module was imported: the child's start, less torch's
    import)."""
    result = run_one_job(json.loads(args.run_job), IMPORTED)
    Path(args.result).write_text(json.dumps(result, default=float) + '\n')
    return result


# ----------------------------------------------------------------------------- many runs


def identity(job: dict) -> dict:
    """What a run trains: the job less its group and paths (a probe run and a comparison
    run of the same row, setting and seed are the same run, wherever the checkout is; the
    data root is a function of the setting)."""
    return {k: v for k, v in job.items() if k not in ('group', 'work_dir', 'data_root')}


def saved_result(job: dict) -> dict | None:
    """The finished result an earlier run of exactly this job left in its work dir."""
    out = Path(job['work_dir']) / 'result.json'
    if out.is_file():
        result = json.loads(out.read_text())
        if identity(result.get('job', {})) == identity(job) and result.get('status') == 'ok':
            return result
    return None


FROM_WORK_DIR = 'its work dir'  # a reused result's source: the job's own work dir


def _reused(job: dict, saved: dict, where: str) -> dict:
    # The result answers this job. One that a results json had reused keeps the json it
    # came from; "its work dir" named the work dir of that json's job, not of this one.
    earlier = saved.get('reused_from')
    return dict(saved, job=job,
                reused_from=earlier if earlier and earlier != FROM_WORK_DIR else where)


def _child_env() -> dict:
    env = dict(os.environ)
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
        env[var] = '1'
    return env


def _failed(job: dict, status: str, wall: float, cpu: float) -> dict:
    nan = float('nan')
    return dict(job=job, status=status, mAP=nan, mAP50=nan, mAP75=nan, final_loss=nan,
                loss_curve=[], iters=0, lr=nan, train_s=nan, val_s=nan, wall_s=wall,
                cpu_s=cpu, load_end=load_average())


def run_jobs(jobs: list[dict], workers: int, *, command: Path, in_process: Callable,
             log=print, reuse: bool = False,
             recorded: Iterable[tuple[str, list[dict]]] = (),
             start_order: list[int] | None = None,
             on_result: Callable[[dict, dict], None] | None = None) -> list[dict]:
    """Run the jobs, ``workers`` child processes of ``command`` at a time (``command
    --run-job JOB --result PATH``), or with ``workers`` 0 one after the other in this
    process (``in_process(job)``). Jobs start in ``start_order`` (indices; default: as
    given). With ``reuse``, a job whose finished result is in its work dir, or in one of
    ``recorded`` (where, results: a results json), is not run again. Every result is
    written to its work dir's result.json as it finishes, and handed to ``on_result(job,
    result)`` (a reused one too, before any run starts). Returns the results in the jobs' order."""
    order = list(range(len(jobs))) if start_order is None else list(start_order)
    results: dict[int, dict] = {}
    recorded = list(recorded)
    if reuse:
        for i in order:
            saved = saved_result(jobs[i])
            if saved is not None:
                results[i] = _reused(jobs[i], saved, FROM_WORK_DIR)
                log(f'reusing {jobs[i]["work_dir"]}/result.json')
                continue
            for where, earlier in recorded:
                saved = next((r for r in earlier if r.get('status') == 'ok'
                              and identity(r.get('job', {})) == identity(jobs[i])), None)
                if saved is not None:
                    results[i] = _reused(jobs[i], saved, str(where))
                    log(f'reusing {jobs[i]["row"]} seed {jobs[i]["seed"]} from {where}')
                    break
        order = [i for i in order if i not in results]
        for i in sorted(results):
            if on_result is not None:
                on_result(jobs[i], results[i])
    start = time.perf_counter()

    def finish(i, result):
        results[i] = result
        work = Path(jobs[i]['work_dir'])
        work.mkdir(parents=True, exist_ok=True)
        (work / 'result.json').write_text(json.dumps(result, default=float) + '\n')
        j = jobs[i]
        log(f'[{len(results)}/{len(jobs)} {time.perf_counter() - start:5.0f}s] '
            f'{j["label"]:38s} {j["batch"]}x{j["accum"]} {j["setting"]["images"]} img seed '
            f'{j["seed"]}: mAP {result["mAP"]:.3f} mAP50 {result["mAP50"]:.3f} loss '
            f'{result["final_loss"]:.3f} CPU {result["cpu_s"]:.0f}s wall '
            f'{result["wall_s"]:.0f}s ({result["iters"]} it) {result["status"]}')
        if on_result is not None:
            on_result(jobs[i], result)

    if workers <= 0:
        for i in order:
            finish(i, in_process(jobs[i]))
        return [results[i] for i in range(len(jobs))]
    pending, running = list(order), {}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            work = Path(jobs[i]['work_dir'])
            work.mkdir(parents=True, exist_ok=True)
            for stale in (work / 'child_result.json', work / 'result.json'):
                stale.unlink(missing_ok=True)
            log_file = open(work / 'run.log', 'w')
            proc = subprocess.Popen(
                [sys.executable, str(command), '--run-job', json.dumps(jobs[i]),
                 '--result', str(work / 'child_result.json')],
                stdout=log_file, stderr=subprocess.STDOUT, env=_child_env(), cwd=str(REPO))
            running[i] = (proc, log_file, work / 'child_result.json', time.perf_counter())
        time.sleep(1.0)
        for i, (proc, log_file, out, t0) in list(running.items()):
            # wait4: the child's own CPU time from the kernel, whatever else runs
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            log_file.close()
            del running[i]
            cpu = usage.ru_utime + usage.ru_stime
            if out.is_file():
                result = dict(json.loads(out.read_text()), cpu_s=cpu)  # imports included
            else:
                result = _failed(jobs[i], f'child exit {proc.returncode} (see {log_file.name})',
                                 time.perf_counter() - t0, cpu)
            finish(i, result)
    return [results[i] for i in range(len(jobs))]


def recorded_results(paths: Iterable[Path]) -> list[tuple[str, list[dict]]]:
    """(where, results) of each results json that exists, named from the checkout's root."""
    out = []
    for path in paths:
        path = Path(path).resolve()
        if path.is_file():
            shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            out.append((str(shown), json.loads(path.read_text())['results']))
    return out


# ----------------------------------------------------------------------------- report


def merge_probes(path: Path, fresh: list[dict], fields: tuple[str, ...]) -> dict:
    """The probes json at ``path`` with ``fresh`` added: an entry of the same setting and
    ``fields`` (e.g. batch and seed) is replaced. Writes it and returns it."""
    def key(e):
        return (json.dumps(e['setting'], sort_keys=True), *(e[f] for f in fields))
    saved = json.loads(path.read_text()) if path.is_file() else dict(probes=[])
    keys = {key(e) for e in fresh}
    saved['probes'] = [e for e in saved['probes'] if key(e) not in keys] + fresh
    path.write_text(json.dumps(saved, indent=1, default=float) + '\n')
    return saved


def reuse_note(results: list[dict]) -> str:
    """How many of ``results`` this invocation trained and where the others came from."""
    sources: dict[str, int] = {}
    for r in results:
        if r.get('reused_from'):
            sources[r['reused_from']] = sources.get(r['reused_from'], 0) + 1
    if not sources:
        return ''
    trained = len(results) - sum(sources.values())
    return (f' ({trained} trained by it; reused, as finished earlier: '
            + ', '.join(f'{n} from {where}' for where, n in sorted(sources.items()))
            + '; their wall and CPU times are those of their own runs)')


def header(run: dict, setting_text: str, tail: str, runs: str | None = None) -> list[str]:
    """The lines a generated report opens with: the command, when, how many runs (``runs``,
    default: the results and where the reused ones came from) on which machine and load;
    then the setting and schedule, the seeds and ``tail``."""
    s = run['setting']
    runs = runs or f'{len(run["results"])} runs{reuse_note(run["results"])}'
    return [
        '',
        f'Generated by `{run["command"]}` on {run["when"]}: {runs}, '
        f'{run["workers"]} at a time (one torch thread each), total {run["wall_s"] / 60:.1f} '
        f'min on {run["machine"]}; load average {run["load_start"]} at the start, '
        f'{run["load_end"]} at the end.',
        '',
        f'Setting: {setting_text}; large batch {s["large"]}, small batch {s["small"]}; '
        f'lr {s["lr_per_image"]:g} per image per step (linear scaling), warm-up '
        f'{s["warmup"]:.0%} and CBN burn-in {s["burn_in"]:.0%} of the iterations, lr x0.1 at '
        f'80 % and 93 %; seeds {run["seeds"]}. ' + tail,
    ]


def publish(run: dict, out_dir: Path, results_json: str, draw: Callable, plot_name: str,
            doc: str, begin: str, end: str, block: str, title: str, table: str) -> None:
    """Write a comparison (its json, its figure and its block of the doc), print its
    ``table`` and name the runs that did not finish."""
    (out_dir / results_json).write_text(json.dumps(run, indent=1, default=float) + '\n')
    draw(run, out_dir / plot_name)
    write_block(out_dir / doc, begin, end, block, title)
    print(table)
    bad = [r['job']['label'] for r in run['results'] if r['status'] != 'ok']
    if bad:
        print(f'runs that did not finish: {bad}', flush=True)


def by_setting(probes: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Probe entries grouped by their setting, in the order the settings first appear."""
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for p in probes:
        groups.setdefault(json.dumps(p['setting'], sort_keys=True), (p['setting'], []))[1].append(p)
    return list(groups.values())


def rerender(out_dir: Path, doc: str, title: str, parts: Iterable[tuple]) -> None:
    """``--from-json``: for each (json name, begin, end, render, draw) whose json is in
    ``out_dir``, draw its figure (``draw(saved, out_dir)``, None: none) and write
    ``render(saved)`` between its markers of ``doc``. Trains nothing."""
    for name, begin, end, render, draw in parts:
        path = out_dir / name
        if path.is_file():
            saved = json.loads(path.read_text())
            if draw is not None:
                draw(saved, out_dir)
            write_block(out_dir / doc, begin, end, render(saved), title)
