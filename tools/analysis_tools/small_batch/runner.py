"""Training one run (``train_run``) and running a list of them (``run_jobs``: worker
processes, a json-lines cache that an interrupted study resumes from)."""
from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cbn_plugin

from .data import load_task
from .models import ARCHS, cbn_kwargs
from .probe import NormProbe, gradient_fidelity, radial_stats, running_stats_error


def evaluate(model, x, y, batch=512):
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    model.train(was)
    return correct / len(x)


def _mean_dicts(dicts):
    keys = dicts[0].keys()
    return {k: float(np.nanmean([d[k] for d in dicts])) for k in keys}


def train_run(cfg: dict) -> dict:
    """One training run; returns accuracy, loss, and the measurements.

    cfg keys: task, arch, norm (spec), batch, samples, lr, seed, and optionally
    measure (number of analysis points), wd, burn_in_samples, precise_samples,
    precise_batch, accumulate.

    ``accumulate`` (gradient accumulation): each optimizer step's ``batch`` images are
    split into ``accumulate`` equal micro-batches, each its own forward and backward with
    its loss divided by ``accumulate`` (the step's gradient is the mean over its images,
    as mmengine's ``accumulative_counts``), then one ``opt.step()`` and one
    ``cbn_plugin.step``: BN normalises each micro-batch on its own, CBN pools the step's
    calls into one slot (its ``accumulation`` option says how; ``'two_pass'`` runs the
    step's micro-batches through ``cbn_plugin.statistics_pass`` first). Such a run keeps no probe
    (its emulation of the running statistics assumes one call per step): it is evaluated
    with the layer's own running statistics.
    """
    torch.set_num_threads(1)
    torch.manual_seed(cfg['seed'])
    xtr, ytr, xte, yte = load_task(cfg['task'])
    build = lambda: ARCHS[cfg['arch']](cfg['norm'])  # noqa: E731
    model = build()
    batch = cfg['batch']
    steps = max(1, cfg['samples'] // batch)
    accumulate = cfg.get('accumulate', 1)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1 \
            or batch % accumulate:
        raise ValueError(f'accumulate must be an integer >= 1 dividing batch={batch} '
                         f'(micro-batches per optimizer step), got {accumulate!r}')
    if accumulate > 1 and cfg.get('measure', 0):
        raise ValueError(f'measure={cfg["measure"]}: the analysis points need one forward per '
                         f'step; with accumulate={accumulate} use measure=0')
    micro = batch // accumulate
    calls = 0  # training forwards (micro-batches)
    two_pass = any(layer.accumulation == 'two_pass' for _, layer in cbn_plugin.cbn_layers(model))
    probe = None
    if cbn_plugin.cbn_layers(model):
        cbn_plugin.bind(model, logger=None)
        for _, layer in cbn_plugin.cbn_layers(model):
            layer.set_schedule(burn_in_steps=cfg.get('burn_in_samples', 0) // batch)
        if accumulate == 1:
            probe = NormProbe(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg['lr'], momentum=0.9,
                          weight_decay=cfg.get('wd', 5e-4))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = np.random.default_rng(cfg['seed'])
    order = np.concatenate([gen.permutation(len(xtr))
                            for _ in range(steps * batch // len(xtr) + 1)])
    pop_idx = torch.from_numpy(np.random.default_rng(1234).permutation(len(xtr))[:512])
    population = xtr[pop_idx]
    window = cfg['norm'].get('window', 1)
    history = deque(maxlen=max(1, window - 1))
    n_measure = cfg.get('measure', 0)
    # Measurement points: evenly spread once the window is full.
    first = min(steps - 1, window + 1)
    points = set(np.linspace(first, steps - 1, n_measure).round().astype(int).tolist()) \
        if n_measure else set()
    analyses, radial, grad_checks = [], [], []
    losses, status = [], 'ok'
    start, cpu_start = time.perf_counter(), time.process_time()
    for s in range(steps):
        xb = xtr[torch.from_numpy(order[s * batch:(s + 1) * batch])]
        yb = ytr[torch.from_numpy(order[s * batch:(s + 1) * batch])]
        if accumulate > 1:
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            if two_pass:  # the statistics pass over the step's micro-batches first
                with cbn_plugin.statistics_pass(model):
                    for i in range(0, batch, micro):
                        model(xb[i:i + micro])
            for i in range(0, batch, micro):
                try:
                    loss = F.cross_entropy(model(xb[i:i + micro]), yb[i:i + micro]) / accumulate
                except (ValueError, RuntimeError) as exc:
                    status = f'error at step {s}: {str(exc).splitlines()[0][:150]}'
                    break
                calls += 1
                if not torch.isfinite(loss):
                    status = f'non-finite loss at step {s}'
                    break
                loss.backward()
                step_loss += loss.item()
            if status != 'ok':
                break
            opt.step()
            sched.step()
            cbn_plugin.step(model)
            losses.append(step_loss)
            continue
        calls += 1
        try:
            loss = F.cross_entropy(model(xb), yb)
        except (ValueError, RuntimeError) as exc:
            status = f'error at step {s}: {str(exc).splitlines()[0][:150]}'
            break
        if not torch.isfinite(loss):
            status = f'non-finite loss at step {s}'
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s in points:
            radial.append(radial_stats(model))
            if probe is not None:
                old = list(reversed(history))
                analyses.append(probe.analyse(model, old, population))
                if any(used for *_, used in probe.used.values()):
                    grad_checks.append(gradient_fidelity(model, probe, build, old, xb, yb,
                                                         float(loss.detach())))
        opt.step()
        sched.step()
        cbn_plugin.step(model)
        history.append(xb)
        losses.append(loss.item())
    train_time = time.perf_counter() - start
    cpu_time = time.process_time() - cpu_start
    acc = {'batch': float('nan'), 'window': float('nan')}
    running_err = {}
    if status == 'ok':
        if probe is None:
            acc['batch'] = acc['window'] = evaluate(model, xte, yte)
            running_err['batch'] = running_stats_error(model, population)
        else:
            for key in ('batch', 'window'):  # the same weights, each running-statistics rule
                restore = probe.swap_running(key)
                acc[key] = evaluate(model, xte, yte)
                running_err[key] = running_stats_error(model, population)
                restore()
    n_tail = max(1, len(losses) // 10)
    result = dict(cfg=cfg, acc=acc['batch'], acc_window=acc['window'],
                  final_loss=float(np.mean(losses[-n_tail:])) if losses else float('nan'),
                  status=status, steps=steps, steps_done=len(losses), time=train_time,
                  cpu_time=cpu_time, forward_calls=calls, running_error=running_err)
    if accumulate > 1 and cbn_plugin.cbn_layers(model):
        first = cbn_plugin.cbn_layers(model)[0][1]
        result['layer'] = dict(args=cbn_kwargs(cfg['norm']), stats_backward=first.stats_backward,
                               compensation=first.compensation,
                               running_stats=first.running_stats,
                               window_size=first.window_size, rho=first.rho,
                               accumulation=first.accumulation, momentum=first.momentum,
                               steps_done=first.steps_done)
    if probe is not None:
        # the layer's own running statistics must be the probe's copy of its rule
        first = probe.layers[0][1]
        key = first.running_stats
        result['layer'] = dict(args=cbn_kwargs(cfg['norm']), stats_backward=first.stats_backward,
                               compensation=first.compensation, running_stats=key,
                               window_size=first.window_size, rho=first.rho)
        result['ema_check'] = max(
            float((layer.running_mean - probe.ema[n][key][0]).abs().max())
            for n, layer in probe.layers) if status == 'ok' else float('nan')
        probe.remove()
    if status == 'ok' and cfg.get('precise_samples'):
        result.update(precise_accuracy(model, xtr, xte, yte, cfg.get('precise_batch', batch),
                                       cfg['precise_samples']))
    layers = sorted({n for a in analyses for n in a})
    if layers:
        result['analysis'] = {n: _mean_dicts([a[n] for a in analyses if n in a])
                              for n in layers}
        result['analysis_points'] = len(analyses)
    if grad_checks:
        result['grad_fidelity'] = _mean_dicts(grad_checks)
    if radial:
        names = list(radial[0])
        result['radial_cos'] = {n: float(np.mean([r[n][0] for r in radial])) for n in names}
        result['weight_norm'] = {n: [r[n][1] for r in radial] for n in names}
    return result


def precise_accuracy(model, xtr, xte, yte, batch: int, samples: int) -> dict:
    """Test accuracy with inference statistics recomputed from ``samples`` training
    images at the training batch size, the weights fixed (``cbn_plugin.recompute_statistics``:
    each CBN layer pools its window of k batches as training did; BN layers are
    fvcore's PreciseBN). Changes the model's running statistics."""
    order = torch.from_numpy(np.random.default_rng(4321).permutation(len(xtr)))
    num = max(1, samples // batch)
    windows = [layer.window_size for _, layer in cbn_plugin.cbn_layers(model)]
    num = max(num, max(windows, default=1))
    picks = order.repeat(num * batch // len(xtr) + 1)
    batches = (xtr[picks[i * batch:(i + 1) * batch]] for i in range(num))
    cbn_plugin.recompute_statistics(model, batches, num_batches=num,
                                    forward=lambda m, b: m(b))
    return dict(acc_precise=evaluate(model, xte, yte), precise_batches=num)


def _key(cfg):
    return json.dumps({k: v for k, v in cfg.items()
                       if k not in ('group', 'label', 'measure', 'base_lr')}, sort_keys=True)


def _cost(cfg):
    per_step = 1.0 + (2.0 if cfg['norm']['kind'] == 'cbn' else 0.0)
    per_step *= 3 if cfg['arch'] == 'resnet' else 1
    return cfg['samples'] // cfg['batch'] * per_step


# The order runs start in: the goal's evidence first (main grid, the second setting's
# first seed, learning rates), then the rest; largest first within each part.
PRIORITY = {'main': 0, 'second': 1, 'lrsweep': 2, 'sweep': 3, 'raw': 4, 'resnet': 5}


def _order(cfg):
    later = cfg['group'] in ('second', 'resnet') and cfg['seed'] > 0
    return (6 if later else PRIORITY.get(cfg['group'], 6), -_cost(cfg))


def _worker(cfg):
    try:
        return train_run(cfg)
    except Exception as exc:  # a crash is a result too
        return dict(cfg=cfg, acc=float('nan'), acc_window=float('nan'), final_loss=float('nan'),
                    status=f'crash: {type(exc).__name__}: {exc}'[:200], steps=0, steps_done=0,
                    time=0.0)


def run_jobs(jobs, workers: int, log=print, cache: Path | None = None):
    """Run the distinct jobs (largest first, ``workers`` processes); one result per job.

    ``cache``: a json-lines file; every finished run is appended to it, and runs found in
    it are not run again (an interrupted study resumes where it stopped).
    """
    unique = {}
    for cfg in jobs:
        key = _key(cfg)
        if key not in unique or cfg.get('measure', 0) > unique[key].get('measure', 0):
            unique[key] = cfg
    done = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text().splitlines():
            res = json.loads(line)
            key = _key(res['cfg'])
            if key in unique and res['cfg'].get('measure', 0) >= unique[key].get('measure', 0):
                done[key] = res
        log(f'{len(done)} runs taken from {cache}')
    todo = sorted((c for k, c in unique.items() if k not in done), key=_order)
    start = time.perf_counter()
    if workers <= 1:
        results = map(_worker, todo)
    else:
        import multiprocessing as mp
        pool = mp.get_context('spawn').Pool(workers)
        results = pool.imap_unordered(_worker, todo)
    for i, res in enumerate(results):
        done[_key(res['cfg'])] = res
        if cache is not None:
            with cache.open('a') as f:
                f.write(json.dumps(res, default=float) + '\n')
        c = res['cfg']
        log(f'[{i + 1}/{len(todo)} {time.perf_counter() - start:6.0f}s] {c["group"]:7s} '
            f'{c["arch"]:6s} {c["label"]:22s} b={c["batch"]:<2d} lr={c["lr"]:.4g} '
            f'k={c["norm"].get("window", "-")} seed={c["seed"]}: acc {res["acc"]:.3f}'
            f'/{res["acc_window"]:.3f} loss {res["final_loss"]:.3f} {res["time"]:.0f}s '
            f'{res["status"]}')
    if workers > 1:
        pool.close()
        pool.join()
    out = []
    for cfg in jobs:
        res = dict(done[_key(cfg)])
        res['cfg'] = cfg
        out.append(res)
    return out, time.perf_counter() - start
