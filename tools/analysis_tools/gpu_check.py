"""CBN on a GPU in one command: correctness, speed and memory, and a verdict per goal.

Writes ``docs/gpu.md`` and ``docs/gpu.json`` (``--out``): the machine and versions, each
part's figures or its failure, and the verdicts of issue 31's goals. Every part is
guarded: one that raises is recorded with its traceback and the others still run; the
report is rewritten after each part, so a run cut short leaves what it measured.

Built for the GPU machine this project borrows: one H100 or H200, Python 3.12 with torch
(CUDA), no mmcv, mmengine or mmdet, no network, and ``python3`` instead of ``.venv``.
It needs the plugin's core and torch alone (``tests/test_torch_only.py``); the models
are plain torch modules (``detection_stack.py``), the oracles ``tests/oracle.py`` and
``tests/exact_oracle.py``. Nothing needs carrying. Through the device tool, as one call
(``timeout_s`` 420: the parts stop at ``--budget-s`` 315 s, a compile row 20 s past it at
the latest; with the machine's start, under 8 minutes, leaving room to rerun once within
the 15 minutes of device time):

    set -o pipefail; PYTHONUNBUFFERED=1 python3 tools/analysis_tools/gpu_check.py \\
        --out $OUT/gpu.md 2>&1 | tee $OUT/gpu_check.log

(or ``make gpu-check GPU_OUT=$OUT/gpu.md``), then copy ``gpu.md`` and ``gpu.json`` from the
call's files into ``docs/``. Three files come back (the limit is 8).
On the CPU, ``--device cpu --smoke`` runs every part at tiny sizes (the tests, and the
committed page until a GPU has run it).

Parts, in the order they run (the time budget, ``--budget-s``, skips what is left):

- ``oracles``: the float64 brute forces on the device: the default (compensated)
  backward under both compensations against ``ExactOracle``, the paper's backward and
  compensation against ``OracleCBN``; outputs, input gradients, running statistics and
  every parameter's gradient over SGD steps, at the tests' tolerances.
- ``train``: ResNet-50 + FPN + 4conv1fc with CBN in every norm (the plugin's converter),
  ``--steps`` steps from step 0 (no burn-in); on CUDA after ``--warmup`` steps under
  ``torch.cuda.set_sync_debug_mode('error')``: a sync is recorded with its site and the
  rest of the steps run in 'warn' mode to count the others.
- ``amp``: the same under fp16 autocast with ``torch.amp.GradScaler``: finite, skipped
  steps counted and the windows' clocks equal to the optimizer steps taken; a forced
  skipped step leaves the windows as a run where that batch never came.
- ``state_dict``: a filled window through ``torch.save``/``torch.load`` into a fresh model
  on the device: same buffers, same loss.
- ``layers``: conv + norm layer steps at detection sizes (FPN 3x3 256->256 at 200x336 and
  100x168, box head 3x3 over 512 RoIs of 7x7): BN, GN, CBN default / paper / naive at
  k = 4 and the derived k = 32; device time, host time, kernel launches, aten ops.
- ``stack``: the R50-FPN stack at 2 images of 800x1333: BN, GN in FPN + head, CBN in FPN
  + head (the paper's placement), CBN everywhere (k = ``--window``, 8): step time (wall,
  host, device) and peak memory (the step's peak + what persists between steps).
- ``compile``: BN and CBN in FPN + head under ``torch.compile`` and
  ``mode='reduce-overhead'``: compile time, step time, peak memory, graphs, breaks.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import json
import logging
import math
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for path in (ROOT, HERE, ROOT / 'tests'):  # the package, its sibling tools, the oracles
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import benchmark  # noqa: E402
import cbn_plugin  # noqa: E402
import detection_stack as ds  # noqa: E402
import host_overhead  # noqa: E402
from cbn_plugin.versions import installed_version  # noqa: E402
from exact_oracle import ExactOracle  # noqa: E402
from oracle import OracleCBN, sgd_in_lockstep  # noqa: E402

PARTS = ('oracles', 'train', 'amp', 'state_dict', 'layers', 'stack', 'compile')
# Issue 31's goals for the first GPU run.
GOAL_TIME_FPN_HEAD = 1.10
GOAL_TIME_ALL = 1.5
GOAL_MEMORY_FPN_HEAD = 1.15
GOAL_MEMORY_WINDOW = 8
STACK_ROWS = {  # name -> (norm, placement)
    'BN': ('bn', 'fpn_head'),
    'GN in FPN + head': ('gn', 'fpn_head'),
    'CBN in FPN + head': ('cbn', 'fpn_head'),
    'CBN everywhere': ('cbn', 'all'),
}
COMPILE_NORMS = ('BN', 'CBN in FPN + head')
COMPILE_MODES = ('default', 'reduce-overhead')
# Ops that read a tensor on the host (item, int, float, bool, a data-dependent size) or
# make one from host data: each a sync or a blocking copy on CUDA. The CPU smoke run's
# stand-in for torch.cuda.set_sync_debug_mode.
SYNCING_OPS = ('aten._local_scalar_dense', 'aten.is_nonzero', 'aten.equal', 'aten.nonzero',
               'aten.masked_select', 'aten._unique2', 'aten.unique_dim',
               'aten.unique_consecutive', 'aten.lift_fresh')
# The tests' tolerances (tests/test_exact_backward.py, tests/test_oracle.py).
ORACLE_TOLERANCES = dict(output=(1e-9, 1e-9), input_grad=(1e-8, 1e-9),
                         running=(1e-9, 1e-12), params=(1e-7, 1e-9))
ORACLE_RUNS = {
    'default backward, var compensation (ExactOracle)':
        dict(oracle=ExactOracle, cbn=dict(compensation='var'), rule='clamp'),
    'default backward, mu_nu compensation (ExactOracle)':
        dict(oracle=ExactOracle, cbn=dict(compensation='mu_nu'), rule='clamp'),
    "paper's backward and compensation, exclude rule (OracleCBN)":
        dict(oracle=OracleCBN, cbn=dict(mode='paper'), rule='exclude'),
}
# What to run on the borrowed GPU machine (device tool: one call, timeout_s 420, nothing
# carried), as the docstring says.
GPU_COMMAND = ('set -o pipefail; PYTHONUNBUFFERED=1 python3 tools/analysis_tools/gpu_check.py '
               '--out $OUT/gpu.md 2>&1 | tee $OUT/gpu_check.log')
# Tiny sizes for the CPU: every part runs, in seconds (tests, the committed smoke page).
SMOKE = dict(image=(64, 96), train_image=(64, 96), rois=8, base=8, channels=32,
             blocks=(1, 1, 1, 1), layer_channels=32, fpn_sizes=('16x24', '8x12'),
             steps=12, layer_repeats=7, stack_repeats=3, compile_backend='aot_eager',
             compile_steps=2, compile_repeats=2, compile_reserve_s=0.0, threads=1,
             budget_s=900.0)


# ---------------------------------------------------------------- shared pieces
def sync_debug(mode):
    """``torch.cuda.set_sync_debug_mode`` where CUDA is (a no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(mode)


def make_optimizer(model, lr: float):
    """SGD with momentum and the plugin's ``StepTracker``, as a training loop without
    OpenMMLab uses it: a step ``GradScaler`` skipped is forgotten, not recorded."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    return optimizer, cbn_plugin.StepTracker(model, optimizer)


def training_step(model, optimizer, tracker, batches, loss_fn=None, scaler=None, amp=None,
                  before=None, taken=None):
    """``step(i)``: one optimizer step on ``batches[i % len]`` and ``tracker.end_step()``
    (``loss_fn``: a compiled ``model.loss``; ``amp``: an autocast dtype, with ``scaler``;
    ``before``: called first, e.g. CUDA graphs' step mark; ``taken``: a list that gets
    whether the optimizer stepped). Returns the loss, on the device (no sync)."""
    loss_fn = loss_fn or model.loss
    device_type = batches[0].images.device.type

    def step(i: int):
        if before is not None:
            before()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp or torch.float16, enabled=amp is not None):
            loss = loss_fn(batches[i % len(batches)])
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        stepped = tracker.end_step()
        if taken is not None:
            taken.append(stepped)
        return loss.detach()
    return step


def stack(args, norm: str, placement: str, device):
    """The detection stack of ``norm`` at ``placement`` on ``device``, seeded."""
    torch.manual_seed(args.seed)
    return ds.build_stack(norm, placement, args.window, args.base, args.channels,
                          tuple(args.blocks)).to(device)


def batches(args, size, device, count: int = 2):
    return [ds.make_batch(args.images, *size, args.rois, device, seed=args.seed + i)
            for i in range(count)]


def window_state(model) -> dict:
    """Every CBN layer's window buffers (cloned), by ``layer.buffer`` name."""
    out = {}
    for name, layer in cbn_plugin.cbn_layers(model):
        for buffer in cbn_plugin.layer.WINDOW_BUFFERS:
            value = getattr(layer, buffer, None)
            if isinstance(value, torch.Tensor):
                out[f'{name}.{buffer}'] = value.detach().clone()
    return out


def window_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two ``window_state``s (inf if keys differ)."""
    if a.keys() != b.keys():
        return math.inf
    return max((float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
                for x, y in zip(a.values(), b.values())), default=0.0)


def clocks(model) -> list[int]:
    return sorted({layer.steps_done for _, layer in cbn_plugin.cbn_layers(model)})


def run_steps(step, steps: int, warmup: int, device, model) -> dict:
    """``step(i)`` for ``i < steps``, the steps from ``warmup`` on checked for syncs:
    ``cuda_syncs`` on CUDA, ``host_reads`` on the CPU. Returns the losses and the counts."""
    losses = [step(i) for i in range(min(warmup, steps))]
    checked = cuda_syncs if device.type == 'cuda' else host_reads
    result = checked(step, range(len(losses), steps), model, losses)
    return dict(result, losses=torch.stack(losses) if losses else None,
                steps_checked=max(0, steps - warmup))


def cuda_syncs(step, indices, model, losses: list) -> dict:
    """The steps under sync debug mode 'error'. A sync raised there is recorded (step,
    message, the traceback's last frames), the step's forwards are forgotten, and the
    remaining steps run in 'warn' mode, each sync warning counted by its Python site."""
    syncs, first, sites, mode = 0, None, collections.Counter(), 'error'
    for i in indices:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            sync_debug(mode)
            try:
                losses.append(step(i))
            except RuntimeError as exc:
                if 'synchroniz' not in str(exc):
                    raise
                syncs += 1
                frames = traceback.extract_tb(exc.__traceback__)
                sites[f'{Path(frames[-1].filename).name}:{frames[-1].lineno}'] += 1
                first = first or dict(step=i, error=str(exc).splitlines()[0][:300],
                                      traceback=traceback.format_exc(limit=-8)[-3000:])
                cbn_plugin.skip_step(model)  # the interrupted step's forwards
                mode = 'warn'
            finally:
                sync_debug(0)
        for w in caught:
            if 'synchroniz' in str(w.message):
                syncs += 1
                sites[f'{Path(w.filename).name}:{w.lineno}'] += 1
    return dict(syncs=syncs, first_sync=first, sync_sites=dict(sites))


def host_reads(step, indices, model, losses: list) -> dict:
    """The CPU's stand-in for the sync debug mode: the aten ops of the steps that read a
    tensor on the host or make one from host data (``SYNCING_OPS``), each a sync or a
    blocking copy on CUDA, counted by name (host_overhead's op counter)."""
    with host_overhead.OpCounter() as counter:
        for i in indices:
            losses.append(step(i))
    reads = {op: n for op, n in sorted(counter.counts.items()) if op in SYNCING_OPS}
    return dict(syncs=None, host_reads=sum(reads.values()), host_read_ops=reads,
                first_sync=None, sync_sites={})


# ---------------------------------------------------------------- part: oracles
def oracle_run(spec: dict, device, steps: int, seed: int = 0) -> dict:
    """Two conv + CBN layers against two oracle layers in float64 on ``device``, in
    lockstep over SGD steps (a large input offset: the window differs from the batch).
    Raises on a difference above the tests' tolerances; returns the largest ones."""
    from torch import nn
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    cbn = dict(window_size=4, rho=1.0, variance_rule=spec['rule'], **spec['cbn'])
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=True), cbn_plugin.CBN(6, **cbn),
                          nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=False),
                          cbn_plugin.CBN(4, **cbn)).double().to(device)
    with torch.no_grad():
        for norm in (model[1], model[4]):
            for p in (norm.weight, norm.bias):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, device=device,
                                         dtype=torch.float64))
    cbn_plugin.bind(model, logger=None)
    ref = copy.deepcopy(model)
    extra = (spec['cbn'].get('compensation', 'var'),) if spec['oracle'] is ExactOracle else ()
    oracles = [spec['oracle'](ref[i], ref[i + 1].weight, ref[i + 1].bias, 4, 1.0,
                              spec['rule'], *extra) for i in (0, 3)]
    worst = dict.fromkeys(ORACLE_TOLERANCES, 0.0)

    def check(kind, got, want):
        worst[kind] = max(worst[kind], float((got - want).detach().abs().max()))
        rtol, atol = ORACLE_TOLERANCES[kind]
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f'{kind}: {m}')

    for _ in range(steps):
        x = torch.randn(2, 4, 6, 6, generator=gen, device=device, dtype=torch.float64) * 2 + 1
        weights = torch.randn(2, 4, 3, 3, generator=gen, device=device, dtype=torch.float64)
        x_ref = x.clone().requires_grad_(True)
        x.requires_grad_(True)
        out, out_ref = model(x), oracles[1](torch.relu(oracles[0](x_ref)))
        check('output', out, out_ref)
        (out * weights).sum().backward()
        (out_ref * weights).sum().backward()
        check('input_grad', x.grad, x_ref.grad)
        grads = [p.grad.clone() for p in model.parameters()]
        ref_grads = [p.grad for p in ref.parameters()]
        worst['params'] = max([worst['params']] + [float((g - r).abs().max())
                                                   for g, r in zip(grads, ref_grads)])
        sgd_in_lockstep(list(model.parameters()), list(ref.parameters()), 0.2,
                        *ORACLE_TOLERANCES['params'])
        cbn_plugin.step(model)  # (the layers update their running statistics here)
        for orc in oracles:
            orc.step()
        for layer, orc in zip((model[1], model[4]), oracles):
            check('running', layer.running_mean, orc.running_mean)
            check('running', layer.running_var, orc.running_var)
    return dict(steps=steps, max_abs_difference=worst, tolerances=ORACLE_TOLERANCES)


def oracles_part(args, device) -> dict:
    return {name: oracle_run(spec, device, args.oracle_steps)
            for name, spec in ORACLE_RUNS.items()}


# ---------------------------------------------------------------- part: train
def train_part(args, device) -> dict:
    model = stack(args, 'cbn', 'all', device)
    taken = []
    step = training_step(model, *make_optimizer(model, args.lr),
                         batches(args, args.train_image, device), taken=taken)
    start = time.perf_counter()
    ran = run_steps(step, args.steps, args.warmup, device, model)
    seconds = time.perf_counter() - start
    losses = ran.pop('losses')
    return dict(ran, model='CBN everywhere', window=args.window, steps=args.steps,
                optimizer_steps=sum(taken), seconds=seconds,
                sync_mode='error after warm-up' if device.type == 'cuda'
                else 'not available on the CPU (torch.cuda.set_sync_debug_mode is CUDA\'s)',
                finite=bool(torch.isfinite(losses).all()), first_loss=float(losses[0]),
                last_loss=float(losses[-1]), window_clocks=clocks(model),
                window_finite=all(bool(torch.isfinite(v.double()).all())
                                  for v in window_state(model).values()))


# ---------------------------------------------------------------- part: amp
def amp_steps(model, args, data, device, loss_fn=None, init_scale: float = 2.0 ** 16):
    """A GradScaler-driven fp16 ``step(i)`` of ``model``, whether each step was taken
    (a list), the scaler."""
    taken = []
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale)
    return (training_step(model, *make_optimizer(model, args.lr), data, loss_fn, scaler,
                          amp=torch.float16, taken=taken), taken, scaler)


def forced_skip(model, args, data, device, scale: float) -> dict:
    """Run A: a step whose loss is inf (GradScaler skips it) on ``data[1]``, then a step
    on ``data[0]``; run B, a copy of the model: the step on ``data[0]`` alone, both from
    the trained ``scale``. A skipped step must leave no trace: the windows of A and B
    equal, their clocks too."""
    other = copy.deepcopy(model)
    poison = [True]

    def poisoned_loss(batch):
        loss = model.loss(batch)
        return loss * math.inf if poison[0] else loss
    step_a, taken_a, _ = amp_steps(model, args, data, device, poisoned_loss, scale)
    step_b, taken_b, _ = amp_steps(other, args, data, device, init_scale=scale)
    step_a(1)
    poison[0] = False
    step_a(0)
    step_b(0)
    difference = window_difference(window_state(model), window_state(other))
    return dict(steps_taken_a=sum(taken_a), steps_taken_b=sum(taken_b),
                window_difference=difference, clocks_a=clocks(model), clocks_b=clocks(other),
                no_trace=difference <= 1e-6 and clocks(model) == clocks(other)
                and taken_a == [False, True] and taken_b == [True])


def amp_part(args, device) -> dict:
    model = stack(args, 'cbn', 'all', device)
    data = batches(args, args.train_image, device)
    step, taken, scaler = amp_steps(model, args, data, device)
    # GradScaler's step reads found_inf on the host (one sync per step by design): this
    # part runs outside the sync debug mode. Which steps were taken is known on the host
    # (the optimizer's post-hook ran or not).
    losses = torch.stack([step(i) for i in range(args.steps)]).cpu()
    flags, taken = taken, sum(taken)
    taken_losses = losses[torch.tensor(flags)]
    state = window_state(model)
    dtypes = sorted({str(v.dtype) for k, v in state.items() if k.endswith(('_mean', '_var'))})
    result = dict(steps=args.steps, optimizer_steps=taken, skipped_steps=args.steps - taken,
                  skipped_at=[i for i, f in enumerate(flags) if not f][:20],
                  finite_losses=int(torch.isfinite(taken_losses).sum()),
                  last_loss=float(losses[-1]), scale=scaler.get_scale(),
                  window_clocks=clocks(model), window_statistics_dtypes=dtypes,
                  window_finite=all(bool(torch.isfinite(v.double()).all())
                                    for v in state.values()))
    result['forced_skip'] = forced_skip(model, args, data, device, result['scale'])
    result['trains'] = (result['finite_losses'] == taken > 0
                        and result['window_clocks'] == [taken]
                        and result['window_finite'] and dtypes == ['torch.float32']
                        and result['forced_skip']['no_trace'])
    return result


# ---------------------------------------------------------------- part: state_dict
def state_dict_part(args, device) -> dict:
    model = stack(args, 'cbn', 'all', device)
    data = batches(args, args.train_image, device)
    step = training_step(model, *make_optimizer(model, args.lr), data)
    for i in range(args.window + 1):  # the window filled
        step(i)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = stack(args, 'cbn', 'all', device)
    fresh.load_state_dict(torch.load(buffer, map_location=device, weights_only=True))
    before, after = window_state(model), window_state(fresh)
    devices = sorted({str(t.device) for t in list(fresh.state_dict().values())})
    losses = []
    for m in (model, fresh):  # a training forward of each: the window in use
        losses.append(m.loss(data[0]).detach())
        for _, layer in cbn_plugin.cbn_layers(m):
            layer.discard_step()
    filled = sorted({int(v.min()) for k, v in before.items() if k.endswith('window_filled')})
    return dict(window_filled=filled, buffers=len(before),
                window_difference=window_difference(before, after),
                clocks=[clocks(model), clocks(fresh)], devices=devices,
                loss_difference=float((losses[0] - losses[1]).abs()),
                round_trip=(window_difference(before, after) == 0.0
                            and clocks(model) == clocks(fresh)
                            and devices == [str(torch.empty(0, device=device).device)]
                            # the same windows and weights: the same loss, up to the
                            # order of a nondeterministic kernel's sums
                            and bool(torch.allclose(losses[0], losses[1], rtol=1e-6,
                                                    atol=0.0))))


# ---------------------------------------------------------------- part: layers
def layer_shapes(args) -> list[tuple[str, int, tuple[int, int]]]:
    """(label, batch, (h, w)) of the FPN and box-head layer steps."""
    c = args.layer_channels
    shapes = []
    for size in args.fpn_sizes:
        h, w = (int(v) for v in size.split('x'))
        shapes.append((f'FPN 3x3 {c}->{c} @{h}x{w}, {args.images} images', args.images, (h, w)))
    shapes.append((f'box head 3x3 {c}->{c}, {args.rois} RoIs @7x7', args.rois, (7, 7)))
    return shapes


def layer_variants() -> dict:
    """BN, GN and CBN default / paper / naive at k = 4 and the derived k = 32."""
    cfgs = {}
    for k in (4, cbn_plugin.derived_window_size(1)):
        named = benchmark.norm_configs(k)
        if not cfgs:
            cfgs.update(BN=named['BN'], GN=named['GN'])
        for name in ('CBN default', 'CBN paper', 'naive CBN'):
            cfgs[f'{name}, k = {k}'] = named[name]
    return cfgs


def timing(times: list) -> dict:
    """Medians and fastest of a list of ``host_overhead.CallTime``, in ms (the ratios take
    the fastest: other jobs on a shared machine only ever slow a call down)."""
    out = {}
    for clock in ('wall', 'host', 'device'):
        values = [getattr(t, clock) * 1e3 for t in times]
        out.update({f'{clock}_ms': statistics.median(values), f'{clock}_fastest_ms': min(values)})
    return out


def layers_part(args, device) -> list:
    rows, cfgs = [], layer_variants()
    fill = max(cfg['window_size'] for cfg in cfgs.values() if 'window_size' in cfg) + 1
    for label, batch, size in layer_shapes(args):
        c = args.layer_channels
        fns, _ = benchmark.layer_steps(batch, c, c, 3, size, cfgs, device, fill)
        times = host_overhead.call_times(fns, args.layer_repeats, device)
        for name, fn in fns.items():
            rows.append(dict(shape=label, norm=name, **timing(times[name]),
                             kernels=host_overhead.device_kernels(fn, device),
                             aten_ops=sum(host_overhead.count_ops(fn).values())))
        base = next(r for r in rows if r['shape'] == label and r['norm'] == 'BN')
        for row in rows:
            if row['shape'] == label:
                row['device_vs_bn'] = row['device_fastest_ms'] / base['device_fastest_ms']
                row['host_vs_bn'] = row['host_fastest_ms'] / base['host_fastest_ms']
        print(f'  {label}: ' + ', '.join(f'{r["norm"]} {r["device_vs_bn"]:.2f}x' for r in rows
                                         if r['shape'] == label), flush=True)
    return rows


# ---------------------------------------------------------------- part: stack
def stack_row(args, name: str, device):
    """(model, optimizer, tracker, data, eager step) of a ``STACK_ROWS`` entry at the
    speed size."""
    model = stack(args, *STACK_ROWS[name], device)
    optimizer, tracker = make_optimizer(model, args.lr)
    data = batches(args, args.image, device, count=1)
    return model, optimizer, tracker, data, training_step(model, optimizer, tracker, data)


def memory_mib(step, model, optimizer, device, peak: bool) -> dict:
    """The step's peak above its start (``peak``), what persists, and their sum, in MiB."""
    peak = host_overhead.step_peak_bytes(lambda: step(0), device) if peak else None
    persistent = host_overhead.persistent_bytes(model, optimizer)
    return dict(step_peak_mib=None if peak is None else peak / 2 ** 20,
                persistent_mib=persistent / 2 ** 20,
                peak_mib=None if peak is None else (peak + persistent) / 2 ** 20)


def stack_part(args, device) -> list:
    built = {}
    for name in STACK_ROWS:
        model, optimizer, _, _, step = stack_row(args, name, device)
        for i in range(args.window + 1):  # the window filled
            step(i)
        built[name] = (model, optimizer, step)
    times = host_overhead.call_times({n: (lambda s=b[2]: s(0)) for n, b in built.items()},
                                     args.stack_repeats, device)
    rows = [dict(norm=name, window=args.window, **timing(times[name]),
                 **memory_mib(step, model, optimizer, device, args.peak))
            for name, (model, optimizer, step) in built.items()]
    base = rows[0]
    for row in rows:
        row['wall_vs_bn'] = row['wall_fastest_ms'] / base['wall_fastest_ms']
        row['peak_vs_bn'] = (None if row['peak_mib'] is None or base['peak_mib'] is None
                             else row['peak_mib'] / base['peak_mib'])
        print(f'  {row["norm"]}: {row["wall_vs_bn"]:.3f}x BN\'s step', flush=True)
    return rows


# ---------------------------------------------------------------- part: compile
@contextlib.contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in this (the main) thread after ``seconds``: a compile that would
    run past the budget is stopped and recorded, the report still written. Yields a dict
    whose ``'stopped'`` says whether it fired (dynamo may wrap the error in its own)."""
    seconds, state = max(seconds, 1.0), dict(stopped=None)

    def expire(*_):
        state['stopped'] = f'stopped after {seconds:.0f} s: the time budget was spent'
        raise TimeoutError(state['stopped'])
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compile_row(args, name: str, mode: str, device) -> dict:
    """The stack's loss compiled (the optimizer step eager) after the window is filled in
    eager (to spend the budget on the pooling graph, not on the first steps' own), beside
    an eager twin stepped alongside (the losses compared): compile + first steps, then
    interleaved-free timing, memory, dynamo's counts."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    model, optimizer, tracker, data, eager = stack_row(args, name, device)
    *_, twin = stack_row(args, name, device)  # the same seed: the same weights and data
    for i in range(args.window + 1):
        eager(i)
        twin(i)
    torch._dynamo.reset()
    counters.clear()
    limit_log = host_overhead._RecompileLimitLog()
    logging.getLogger('torch._dynamo').addHandler(limit_log)
    try:
        loss_fn = torch.compile(model.loss, backend=args.compile_backend,
                                mode=None if mode == 'default' else mode)
        mark = torch.compiler.cudagraph_mark_step_begin if mode == 'reduce-overhead' else None
        step = training_step(model, optimizer, tracker, data, loss_fn, before=mark)
        start, graphs, gaps = time.perf_counter(), [], []
        for i in range(args.compile_steps):
            loss = step(i)
            graphs.append(counters['stats']['unique_graphs'])
            expect = twin(i)
            gaps.append((loss - expect).abs() / expect.abs())
        host_overhead.sync(device)
        compile_s = time.perf_counter() - start
        gap = float(torch.stack(gaps).max()) if gaps else None  # one read, after the steps
        times = host_overhead.call_times({name: lambda: step(0)}, args.compile_repeats, device)
        row = dict(norm=name, mode=mode, backend=args.compile_backend,
                   compile_and_first_steps_s=compile_s, first_steps=args.compile_steps,
                   loss_vs_eager_max_rel=gap,
                   **timing(times[name]),
                   # the CPU's peak comes from the profiler's memory timeline: minutes here
                   **memory_mib(step, model, optimizer, device,
                                peak=args.peak and device.type == 'cuda'),
                   graphs_by_first_step=graphs, graphs=counters['stats']['unique_graphs'],
                   recompile_limit=torch._dynamo.config.recompile_limit,
                   recompile_limit_hits=len(limit_log.hits),
                   graph_breaks=sum(counters['graph_break'].values()),
                   break_reasons=sorted(counters['graph_break'])[:5])
    finally:
        logging.getLogger('torch._dynamo').removeHandler(limit_log)
        torch._dynamo.reset()
    return row


def compile_part(args, device, started: float, progress=None) -> list:
    """Each of ``--compile-modes`` x ``--compile-norms``, in order, while the
    budget lasts; ``progress(rows)`` after each (the report rewritten)."""
    import torch._dynamo
    rows, limit = [], torch._dynamo.config.recompile_limit
    # Each recompile of the whole stack costs a full inductor compile: a low limit bounds
    # the time, and a row that hits it says so (recompile_limit_hits).
    torch._dynamo.config.recompile_limit = args.compile_recompile_limit
    try:
        for mode in args.compile_modes:
            for name in args.compile_norms:
                rows.append(compile_guarded(args, name, mode, device, started))
                row = rows[-1]
                print(f'  {name}, {mode}: ' + (
                    f'{row["wall_fastest_ms"]:.1f} ms' if 'wall_fastest_ms' in row
                    else row.get('skipped') or row.get('error')), flush=True)
                if progress is not None:
                    progress(rows)
    finally:
        torch._dynamo.config.recompile_limit = limit
    return rows


def compile_guarded(args, name: str, mode: str, device, started: float) -> dict:
    left = args.budget_s - (time.perf_counter() - started)
    if mode != 'default' and args.compile_backend != 'inductor':
        return dict(norm=name, mode=mode, skipped=f"mode={mode!r} is inductor's (backend "
                    f'here: {args.compile_backend})')
    if left < args.compile_reserve_s:
        return dict(norm=name, mode=mode, skipped=f'time budget: {left:.0f} s left')
    state = {}
    try:
        with deadline(left + args.compile_grace_s) as state:
            return compile_row(args, name, mode, device)
    except Exception as exc:  # a row's failure is its figure; the next row still runs
        row = dict(norm=name, mode=mode, error=summary(exc),
                   traceback=traceback.format_exc(limit=-8)[-3000:])
        if state.get('stopped'):  # the budget's stop, not a crash
            row.update(stopped=state['stopped'], error=f'TimeoutError: {state["stopped"]}')
        return row


# ---------------------------------------------------------------- running the parts
def summary(exc: BaseException) -> str:
    """The exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f'{type(exc).__name__}: {lines[0][:400] if lines else ""}'


def guarded(name: str, fn) -> dict:
    """Run one part: its result, or its failure (the error and the traceback's end)."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # recorded: the other parts still run
        return dict(status='failed', seconds=time.perf_counter() - start, error=summary(exc),
                    traceback=traceback.format_exc(limit=-10)[-4000:])
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return dict(status='ok', seconds=time.perf_counter() - start, result=result)


def part_functions(args, device, started: float, progress) -> dict:
    return {'oracles': lambda: oracles_part(args, device),
            'train': lambda: train_part(args, device),
            'amp': lambda: amp_part(args, device),
            'state_dict': lambda: state_dict_part(args, device),
            'layers': lambda: layers_part(args, device),
            'stack': lambda: stack_part(args, device),
            'compile': lambda: compile_part(args, device, started, progress)}


def machine(device) -> dict:
    info = benchmark.machine(device)
    info.update(torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                triton=_version('triton'), cbn_plugin=cbn_plugin.__version__,
                layer=host_overhead.layer_state(),
                openmmlab={n: installed_version(n) for n in ('mmengine', 'mmcv', 'mmdet')})
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gib=props.total_memory / 2 ** 30,
                    capability=f'{props.major}.{props.minor}',
                    multiprocessors=props.multi_processor_count,
                    tf32_conv=torch.backends.cudnn.allow_tf32,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


def _version(dist: str):
    import importlib.metadata
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(args, device, out: Path, parts=PARTS) -> dict:
    started = time.perf_counter()
    results = dict(command=args.command, date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
                   machine=machine(device), settings=settings(args), parts={})
    def progress(rows, name='compile'):  # a part's rows so far, in the report
        results['parts'][name] = dict(status='running', seconds=time.perf_counter() - started,
                                      result=rows)
        write_report(results, out)
    functions = part_functions(args, device, started, progress)
    for name in PARTS:
        if name not in parts:
            results['parts'][name] = dict(status='skipped', reason='not asked for (--parts)')
            continue
        left = args.budget_s - (time.perf_counter() - started)
        if left <= 0:
            results['parts'][name] = dict(status='skipped', reason='time budget spent')
        else:
            print(f'{name} ({left:.0f} s of the budget left)', flush=True)
            results['parts'][name] = guarded(name, functions[name])
            print(f'  {name}: {results["parts"][name]["status"]} in '
                  f'{results["parts"][name]["seconds"]:.1f} s', flush=True)
        results['seconds'] = time.perf_counter() - started
        results['verdicts'] = verdicts(results)
        write_report(results, out)
    return results


def settings(args) -> dict:
    keys = ('images', 'image', 'train_image', 'rois', 'base', 'channels', 'blocks', 'window',
            'steps', 'warmup', 'lr', 'layer_channels', 'fpn_sizes', 'layer_repeats',
            'stack_repeats', 'compile_backend', 'compile_steps', 'compile_repeats',
            'compile_recompile_limit', 'compile_norms', 'compile_modes', 'budget_s',
            'oracle_steps', 'seed', 'threads', 'peak')
    return {k: getattr(args, k) for k in keys}


# ---------------------------------------------------------------- verdicts
def part_result(results, name):
    part = results['parts'].get(name, {})
    return part.get('result') if part.get('status') == 'ok' else None


def stack_ratio(results, name: str, key: str):
    rows = part_result(results, 'stack')
    row = next((r for r in rows or [] if r['norm'] == name), None)
    return None if row is None else row.get(key)


def verdicts(results: dict) -> list[dict]:
    """One line per goal: ``goal``, ``met`` (None: not measured) and what was measured."""
    out = []
    failed = sorted(n for n, p in results['parts'].items() if p.get('status') == 'failed')
    failed += [f'compile {r["norm"]} {r["mode"]}' for r in part_result(results, 'compile') or []
               if r.get('error') and not r.get('stopped')]
    out.append(dict(goal='0 crashes (every part and compile row ran without raising)',
                    met=not failed, measured=f'{len(failed)} failed' + (
                        f': {", ".join(failed)}' if failed else '')))
    train = part_result(results, 'train')
    if train is None:
        out.append(dict(goal='0 host syncs in a training step', met=None,
                        measured='not measured: the train part did not run'))
    elif train['syncs'] is None:
        reads = train.get('host_reads')
        out.append(dict(goal='0 host syncs in a training step', met=None if reads is None
                        else reads == 0, measured=f'CPU stand-in (no CUDA here): {reads} '
                        f'host read(s) in {train["steps_checked"]} steps'
                        + (f' ({train["host_read_ops"]})' if reads else '')))
    else:
        out.append(dict(goal='0 host syncs in a training step', met=train['syncs'] == 0,
                        measured=f'{train["syncs"]} sync(s) in {train["steps_checked"]} steps '
                        + (f'(first: {train["first_sync"]["error"]})' if train['first_sync']
                           else '')))
    amp = part_result(results, 'amp')
    out.append(dict(goal='fp16 AMP trains (finite, skipped steps counted and absent from '
                    'the window)', met=None if amp is None else amp['trains'],
                    measured='not measured' if amp is None else
                    f'{amp["finite_losses"]}/{amp["steps"]} finite losses, '
                    f'{amp["skipped_steps"]} skipped, window clocks {amp["window_clocks"]}, '
                    f'forced skip leaves no trace: {amp["forced_skip"]["no_trace"]}'))
    for name, key, goal, unit in (
            ('CBN in FPN + head', 'wall_vs_bn', GOAL_TIME_FPN_HEAD, 'step time'),
            ('CBN everywhere', 'wall_vs_bn', GOAL_TIME_ALL, 'step time'),
            ('CBN in FPN + head', 'peak_vs_bn', GOAL_MEMORY_FPN_HEAD, 'peak memory')):
        ratio = stack_ratio(results, name, key)
        window = results['settings']['window']
        label = f'R50-FPN stack {unit}, {name}: <= {goal:g}x BN\'s' + (
            f' at k = {GOAL_MEMORY_WINDOW}' if unit == 'peak memory' else '')
        if ratio is None:
            out.append(dict(goal=label, met=None, measured='not measured'))
        elif unit == 'peak memory' and window != GOAL_MEMORY_WINDOW:
            out.append(dict(goal=label, met=None, measured=f'{ratio:.3f}x at k = {window}'))
        else:
            out.append(dict(goal=label, met=ratio <= goal, measured=f'{ratio:.3f}x'))
    return out


# ---------------------------------------------------------------- report
def write_report(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(results, indent=1, default=str) + '\n')
    out.write_text('\n'.join(render(results)) + '\n')


def _fmt(value, spec='.2f'):
    return '-' if value is None else format(value, spec)


def render(results: dict) -> list[str]:
    m = results['machine']
    cuda = m['device'].startswith('cuda')
    lines = ['# CBN on a GPU: `make gpu-check`', '']
    if not cuda:
        lines += ['**No GPU has run this check yet.** The figures below are the CPU smoke run '
                  '(`--device cpu`, tiny sizes): they show that every part runs end to end, '
                  'not how CBN does on a GPU, and the verdicts are computed from them the way '
                  'the GPU run\'s will be.', '',
                  'On the GPU machine (the device tool, one call, `timeout_s` 420, nothing '
                  f'carried): `{GPU_COMMAND}`, then `gpu.md` and `gpu.json` from the call\'s '
                  'files into `docs/`.', '']
    lines += [f'Command: `{results["command"]}`, {results["date"]}, '
              f'{results.get("seconds", 0):.0f} s in all.', '',
              '| machine | |', '|---|---|',
              f'| device | {m["device"]}' + (f' ({m.get("gpu")}, {m["gpu_memory_gib"]:.0f} GiB, '
                                             f'sm {m["capability"]})' if cuda else '') + ' |',
              f'| python, torch | {m["python"]}, {m["torch"]} (CUDA {m["torch_cuda"]}, '
              f'cuDNN {m["cudnn"]}, triton {m["triton"]}) |',
              f'| platform | {m["platform"]}, {m["cpus"]} CPUs, {m["threads"]} torch thread(s) |',
              '| OpenMMLab | ' + ', '.join(f'{k} {v or "absent"}' for k, v in
                                            m['openmmlab'].items()) + ' |',
              f'| cbn_plugin | {m["cbn_plugin"]}, commit {m["layer"]["commit"]}'
              + (' with uncommitted changes' if m['layer']['uncommitted_layer_changes'] else '')
              + ' |', '', '## Verdicts', '']
    for v in results.get('verdicts', []):
        mark = 'not measured' if v['met'] is None else 'PASS' if v['met'] else 'FAIL'
        lines.append(f'- {mark}: {v["goal"]}: {v["measured"]}')
    lines += ['', '## Parts', ''] + table(
        ['part', 'status', 'seconds', 'note'],
        [[name, part['status'], _fmt(part.get('seconds'), '.1f'),
          part.get('error') or part.get('reason') or '']
         for name, part in results['parts'].items()])
    for name, part in results['parts'].items():
        if part['status'] == 'failed':
            lines += ['', f'### {name} failed', '', '```', part['traceback'].rstrip(), '```']
        elif part['status'] in ('ok', 'running'):  # running: cut short, its rows so far
            lines += ['', f'## {name}' + (' (cut short)' if part['status'] == 'running'
                                          else ''), ''] + RENDERERS[name](part['result'], results)
    return lines


def table(head: list, rows: list) -> list[str]:
    """A markdown table of ``head`` (column names) and ``rows`` (cells, formatted; a ``|``
    in a cell is written as ``/``)."""
    def line(cells):
        return '| ' + ' | '.join(str(c).replace('|', '/') for c in cells) + ' |'
    return [line(head), '|' + '---|' * len(head)] + [line(row) for row in rows]


def render_oracles(result, _) -> list[str]:
    kinds = ('output', 'input_grad', 'running', 'params')
    return ['Float64, two conv + CBN layers (k = 4, rho = 1) against the brute force, in '
            'lockstep over SGD steps; largest absolute differences (tolerances: the '
            'tests\').', ''] + table(
        ['run', 'steps', 'output', 'input grad', 'running stats', 'parameter grads'],
        [[name, r['steps']] + [f'{r["max_abs_difference"][k]:.1e}' for k in kinds]
         for name, r in result.items()])


def render_train(r, _) -> list[str]:
    checked = (f'syncs: {r["syncs"]}' + (f', by site: {r["sync_sites"]}' if r['sync_sites']
                                         else '') if r['syncs'] is not None else
               f'host reads (ops that sync on CUDA, counted on the CPU instead): '
               f'{r["host_reads"]}' + (f' {r["host_read_ops"]}' if r['host_reads'] else ''))
    return [f'{r["model"]} (k = {r["window"]}), {r["steps"]} steps from step 0 in '
            f'{r["seconds"]:.1f} s: losses finite {r["finite"]} ({r["first_loss"]:.3f} -> '
            f'{r["last_loss"]:.3f}), optimizer steps {r["optimizer_steps"]}, window clocks '
            f'{r["window_clocks"]}, windows finite {r["window_finite"]}.', '',
            f'Sync debug mode: {r["sync_mode"]}; {checked} in {r["steps_checked"]} steps after '
            'the warm-up.'] + (
        ['', '```', r['first_sync']['traceback'].rstrip(), '```'] if r['first_sync'] else [])


def render_amp(r, _) -> list[str]:
    f = r['forced_skip']
    return [f'fp16 autocast, GradScaler, {r["steps"]} steps: {r["optimizer_steps"]} taken, '
            f'{r["skipped_steps"]} skipped; {r["finite_losses"]} finite losses (last '
            f'{r["last_loss"]:.3f}); window clocks {r["window_clocks"]} (one value, the steps '
            f'taken, when skipped steps leave none); window statistics '
            f'{", ".join(r["window_statistics_dtypes"])}, finite {r["window_finite"]}.', '',
            f'Forced skip (a step whose loss is inf, then a real step, against a copy given '
            f'the real step alone): largest window difference {f["window_difference"]:.2e}, '
            f'clocks {f["clocks_a"]} and {f["clocks_b"]}: no trace {f["no_trace"]}.']


def render_state_dict(r, _) -> list[str]:
    return [f'{r["buffers"]} window buffers (window filled: {r["window_filled"]}) through '
            f'torch.save / torch.load(weights_only=True) into a fresh model: largest '
            f'difference {r["window_difference"]:.1e}, clocks {r["clocks"]}, devices '
            f'{r["devices"]}, loss difference of a training forward {r["loss_difference"]:.1e}'
            f': round trip {r["round_trip"]}.']


def render_layers(rows, results) -> list[str]:
    cuda = results['machine']['device'].startswith('cuda')
    return ['Per conv + norm layer step (forward, backward with the input\'s gradient, '
            '`cbn_plugin.step`), windows filled; the fastest of interleaved repeats '
            '(medians in the json). Device time: CUDA events around the step (the wall time '
            'on the CPU); host time: until the step returned; kernels: launches counted by '
            'torch.profiler (CUDA only).', ''] + table(
        ['shape', 'norm', 'device ms', 'vs BN', 'host ms', 'vs BN', 'kernels', 'aten ops'],
        [[r['shape'], r['norm'], f'{r["device_fastest_ms"]:.3f}', f'{r["device_vs_bn"]:.2f}x',
          f'{r["host_fastest_ms"]:.3f}', f'{r["host_vs_bn"]:.2f}x',
          _fmt(r['kernels'], 'd') if cuda else '-', r['aten_ops']] for r in rows])


def render_stack(rows, results) -> list[str]:
    s = results['settings']
    return [f'ResNet-50 + FPN + 4conv1fc, {s["images"]} images of {s["image"][0]}x'
            f'{s["image"][1]}, {s["rois"]} RoIs per image, SGD step included, k = '
            f'{s["window"]}; fastest of {s["stack_repeats"]} interleaved steps for the ratio, '
            'medians otherwise. Peak = the step\'s peak above its start + what persists '
            '(parameters, buffers with the window, optimizer state).', ''] + table(
        ['norm', 'step ms (fastest)', 'vs BN', 'median ms', 'host ms', 'device ms', 'peak MiB',
         'vs BN', 'step peak MiB', 'persistent MiB'],
        [[r['norm'], f'{r["wall_fastest_ms"]:.1f}', f'{r["wall_vs_bn"]:.3f}x',
          f'{r["wall_ms"]:.1f}', f'{r["host_ms"]:.1f}', f'{r["device_ms"]:.1f}',
          _fmt(r['peak_mib'], '.1f'), _fmt(r['peak_vs_bn'], '.3f'),
          _fmt(r['step_peak_mib'], '.1f'), f'{r["persistent_mib"]:.1f}'] for r in rows])


def compile_cells(r: dict, eager: dict | None) -> list:
    ratio = (r['wall_fastest_ms'] / eager['wall_fastest_ms']
             if eager and 'wall_fastest_ms' in r else None)
    note = r.get('skipped') or r.get('error') or ', '.join(r.get('break_reasons', []))
    return [r['norm'], r['mode'], _fmt(r.get('compile_and_first_steps_s'), '.1f'),
            _fmt(r.get('wall_fastest_ms'), '.1f'), _fmt(ratio, '.3f'),
            _fmt(r.get('peak_mib'), '.1f'),
            ', '.join(map(str, r.get('graphs_by_first_step', []))) or '-',
            _fmt(r.get('graphs'), 'd'), f'{_fmt(r.get("recompile_limit_hits"), "d")} (limit '
            f'{_fmt(r.get("recompile_limit"), "d")})', _fmt(r.get('graph_breaks'), 'd'),
            _fmt(r.get('loss_vs_eager_max_rel'), '.1e'), note[:300]]


def render_compile(rows, results) -> list[str]:
    eager = {r['norm']: r for r in part_result(results, 'stack') or []}
    return ['The stack\'s loss under `torch.compile` (the optimizer step eager), after its '
            'first steps (compile time included in them); vs eager: the eager row of the '
            'stack part, same run; loss gap: the largest relative difference between the '
            'compiled loss and an eager twin\'s over the first steps (same weights, data '
            'and steps).', ''] + table(
        ['norm', 'mode', 'compile + first steps s', 'step ms (fastest)', 'vs eager',
         'peak MiB', 'graphs by first step', 'graphs in all', 'recompile-limit fallbacks',
         'graph breaks', 'loss gap vs eager', 'note'],
        [compile_cells(r, eager.get(r['norm'])) for r in rows])


RENDERERS = dict(oracles=render_oracles, train=render_train, amp=render_amp,
                 state_dict=render_state_dict, layers=render_layers, stack=render_stack,
                 compile=render_compile)


# ---------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--out', default=str(ROOT / 'docs' / 'gpu.md'),
                   help='the page; the json goes beside it')
    p.add_argument('--parts', nargs='+', default=list(PARTS), choices=PARTS)
    p.add_argument('--smoke', action='store_true', help='tiny sizes for the CPU (SMOKE)')
    p.add_argument('--from-json', action='store_true',
                   help="measure nothing: render the page again from the json beside --out")
    p.add_argument('--budget-s', type=float, default=315,
                   help='seconds for the parts; what is left when it is spent is skipped')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--oracle-steps', type=int, default=8)
    g = p.add_argument_group('the R50-FPN stack')
    g.add_argument('--images', type=int, default=2)
    g.add_argument('--image', type=int, nargs=2, default=(800, 1333), metavar=('H', 'W'),
                   help='speed and memory rows')
    g.add_argument('--train-image', type=int, nargs=2, default=(512, 853), metavar=('H', 'W'),
                   help='the train, amp and state_dict parts')
    g.add_argument('--rois', type=int, default=512, help='RoIs per image')
    g.add_argument('--base', type=int, default=64, help='ResNet width of the first stage')
    g.add_argument('--channels', type=int, default=256, help='FPN and box head channels')
    g.add_argument('--blocks', type=int, nargs=4, default=ds.STAGE_BLOCKS)
    g.add_argument('--window', type=int, default=GOAL_MEMORY_WINDOW, help='CBN window k')
    g.add_argument('--steps', type=int, default=200, help='train and amp steps')
    g.add_argument('--warmup', type=int, default=3, help='steps before the sync debug mode')
    g.add_argument('--lr', type=float, default=0.0025)
    g.add_argument('--stack-repeats', type=int, default=5)
    g.add_argument('--no-peak', dest='peak', action='store_false',
                   help="skip the step's peak memory (on the CPU it comes from the profiler's "
                   'memory timeline: seconds per row)')
    g = p.add_argument_group('layer steps')
    g.add_argument('--layer-channels', type=int, default=256)
    g.add_argument('--fpn-sizes', nargs='+', default=('200x336', '100x168'))
    g.add_argument('--layer-repeats', type=int, default=20)
    g = p.add_argument_group('torch.compile')
    g.add_argument('--compile-backend', default='inductor')
    g.add_argument('--compile-steps', type=int, default=3,
                   help='first steps, compile included')
    g.add_argument('--compile-repeats', type=int, default=5)
    g.add_argument('--compile-reserve-s', type=float, default=60,
                   help='budget a compile row needs left to start')
    g.add_argument('--compile-grace-s', type=float, default=20,
                   help='how far past the budget a started row may run before it is stopped')
    g.add_argument('--compile-recompile-limit', type=int, default=2,
                   help="dynamo's recompile_limit in this part (each recompile is a full "
                   'compile of the stack)')
    g.add_argument('--compile-norms', nargs='+', default=COMPILE_NORMS, choices=COMPILE_NORMS)
    g.add_argument('--compile-modes', nargs='+', default=COMPILE_MODES, choices=COMPILE_MODES)
    return p


def parse(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.command = 'python3 tools/analysis_tools/gpu_check.py ' + ' '.join(argv)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if args.from_json:
        write_report(json.loads(out.with_suffix('.json').read_text()), out)
        print(f'wrote {out}')
        return 0
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: torch sees no CUDA device here (--device cpu --smoke '
                         'runs the CPU smoke check)')
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args, device, out, args.parts)
    for v in results['verdicts']:
        print(f'{"not measured" if v["met"] is None else "PASS" if v["met"] else "FAIL"}: '
              f'{v["goal"]}: {v["measured"]}')
    failed = [n for n, p in results['parts'].items() if p['status'] == 'failed']
    print(f'wrote {out} and {out.with_suffix(".json")}' + (
        f'; failed parts: {", ".join(failed)}' if failed else ''))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
