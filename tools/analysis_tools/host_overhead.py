"""Host overhead of a norm layer: the framework's work per training step, apart from the maths.

At a tiny size (stacks of conv 1x1 8->8 + norm + ReLU on a 1x8x4x4 input, one torch
thread) the arithmetic is negligible and a training step (zero_grad, forward, backward,
SGD momentum step, ``cbn_plugin.step``) costs what the framework does around it: every
aten op dispatched (on a GPU, most of them a kernel launch) and the Python that issues
them. Both are measured per conv+norm layer per step, from the difference between a
deep and a shallow stack (``--host-layers``, 4 and 12), so that the loss, the optimizer's
fixed cost and the input are cancelled out.

Measured side by side in one process, timings interleaved variant by variant and
repeat by repeat, each the fastest repeat (other jobs on a shared machine only ever
slow a repeat down):

- the tiny stacks: BN, GN, CBN default / paper / naive (rho=0) / dvar_stride=4, CBN
  acting as BN (burn-in), and 4-call gradient accumulation (BN and CBN);
- the top aten ops of one CBN default layer step;
- ``torch.compile``: the stacks compiled, trained ``--compile-steps`` steps; graphs
  compiled, recompile-limit fallbacks, graph breaks (``torch._dynamo.explain``) and
  the host time per layer step beside eager's; a failure is caught and reported;
- SyncCBN in 2 gloo processes beside BN and CBN in the same processes;
- the digits detector of the small-batch detection study (every norm swapped);
- the R50-FPN detector step with the norm in FPN + box head (BN vs CBN default);
- peak memory of a step: what the step allocates above what it starts with, from
  torch's allocator events (``torch.profiler`` with ``profile_memory``; on CUDA the
  allocator's peak), plus what persists between steps (parameters, buffers with the
  window, optimizer state).

``benchmark.py --parts host`` runs this and writes the section of docs/benchmarks.md.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import cbn_plugin

ROOT = Path(__file__).resolve().parents[2]
# The small-batch detection study's detector with BN in every norm layer; its rows swap
# the norm of the backbone, the FPN and the box head (tools/analysis_tools/small_batch_det).
DIGITS_CONFIG = (ROOT / 'configs' / 'small_batch_det'
                 / 'faster-rcnn_r18-w32_fpn_4conv1fc-bn-all_digits.py')
DIGITS_GN_GROUPS = 8   # the study's GN
DIGITS_WINDOW = 4      # the study's window at 1 image per step until the derived one
DIGITS_DERIVED_WINDOW = cbn_plugin.derived_window_size(1)  # CBNHook's at 1 image per step
DIGITS_CANVAS = 128    # the study's canvas
CHANNELS, MAP = 8, 4   # the tiny stack: conv 1x1 8->8 on 1x8x4x4
TINY_GN_GROUPS = 4
ACCUMULATION_CALLS = 4
# The targets for the defaults, checked on every run.
TARGET_OPS_PER_LAYER = 60
TARGET_HOST_RATIO = 3.0
TARGET_DIGITS_RATIO = 1.3
TARGET_R50_RATIO = 1.15
# The record the others are compared with (the layer as it was before its rewrite).
BASELINE_RECORD = 'before the lean layer'


# ---------------------------------------------------------------- counting
def op_name(func) -> str:
    """An aten op by its overload packet (``aten.mul``)."""
    return str(func.overloadpacket)


OUTSIDE_THE_PLUGIN = 'outside the plugin (conv, ReLU, loss, SGD, autograd)'


def issuing_site(func) -> str:
    """An aten op by the innermost ``cbn_plugin`` function on the Python stack when it is
    dispatched (``module.qualname``): what the ops of a layer step are, by concept."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if f'{os.sep}cbn_plugin{os.sep}' in path:
            return f'{Path(path).stem}.{frame.f_code.co_qualname}'
        frame = frame.f_back
    return OUTSIDE_THE_PLUGIN


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by ``key(func)`` (default: its name).

    Ops run below autograd: a composite op (``aten.batch_norm``) is counted as what it
    decomposes into, the ops a backend really executes.
    """

    def __init__(self, key=op_name):
        super().__init__()
        self.key = key
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.key(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_ops(fn, key=op_name) -> collections.Counter:
    """The aten ops one call of ``fn`` dispatches, by ``key`` (name, or ``issuing_site``)."""
    with OpCounter(key) as counter:
        fn()
    return counter.counts


def per_layer(counts: dict[int, collections.Counter]) -> dict[str, float]:
    """Per conv+norm layer: the deep stack's counts minus the shallow one's, per extra
    layer (``counts``: by number of layers, the two stacks)."""
    shallow, deep = sorted(counts)
    return {name: (counts[deep][name] - counts[shallow][name]) / (deep - shallow)
            for name in set(counts[deep]) | set(counts[shallow])}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def device_kernels(fn, device) -> int | None:
    """Kernel launches of ``fn`` on the GPU (torch.profiler); ``None`` on the CPU.

    The host's launch calls (``cudaLaunchKernel`` and kin, a CUDA graph replay
    counted once); where the profiler lists none, the kernels that ran on the device.
    """
    if device.type != 'cuda':
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    events = prof.events()
    launches = sum(1 for e in events if e.device_type == DeviceType.CPU
                   and ('LaunchKernel' in e.name or 'GraphLaunch' in e.name))
    if launches:
        return launches
    return sum(1 for e in events if e.device_type == DeviceType.CUDA
               and 'kernel' in str(getattr(e, 'activity_type', 'kernel')).lower()
               and not e.name.startswith(('Memcpy', 'Memset')))


def step_peak_bytes(fn, device) -> int | None:
    """Bytes ``fn`` allocates at its peak above what was allocated when it started.

    CUDA: the caching allocator's peak. CPU: torch's allocator events, replayed in
    order (``torch.profiler`` with ``profile_memory``, read through the profiler's own
    memory timeline: the plain ``[memory]`` events leave out the allocations made
    inside an op). ``None`` if the profiler cannot say.
    """
    if device.type == 'cuda':
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    try:
        from torch.profiler._memory_profiler import Action
        timeline = prof._memory_profile().timeline
    except Exception as exc:  # a torch whose profiler has no memory timeline
        print(f'    no memory timeline from the profiler: {type(exc).__name__}: {exc}')
        return None
    level = peak = 0
    for _, action, _, size in timeline:
        if action == Action.CREATE:
            level += size
        elif action == Action.DESTROY:
            level -= size
        peak = max(peak, level)
    return peak


def _scaled(value, unit):
    return None if value is None else value / unit


def persistent_bytes(model: nn.Module, optimizer=None) -> int:
    """Bytes held between steps: parameters, buffers (the window included), optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def time_interleaved(fns: dict, repeats: int, steps: int, device) -> dict:
    """Fastest seconds per call of each function over ``repeats`` repeats of ``steps`` calls,
    the functions interleaved repeat by repeat."""
    best = {name: float('inf') for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


class CallTime(NamedTuple):
    """One call's seconds: ``wall`` from a synchronised start to a synchronised end;
    ``host`` until the call returned (on a GPU the device may still be working: the
    host's own cost, launches included); ``device`` between CUDA events recorded
    before and after it (on the CPU, the wall time)."""
    wall: float
    host: float
    device: float


def call_times(fns: dict, repeats: int, device) -> dict[str, list[CallTime]]:
    """Each function's :class:`CallTime` per repeat, one call per repeat, interleaved."""
    cuda = device.type == 'cuda'
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            if cuda:
                events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                events[0].record()
            start = time.perf_counter()
            fn()
            issued = time.perf_counter()
            if cuda:
                events[1].record()
            sync(device)
            wall = time.perf_counter() - start
            times[name].append(CallTime(wall, issued - start, events[0].elapsed_time(
                events[1]) / 1e3 if cuda else wall))
    return times


def median_and_fastest(fns: dict, repeats: int, device, clock: str = 'wall'
                       ) -> tuple[dict, dict]:
    """Median and fastest seconds per call (``clock``: a :class:`CallTime` field), one
    call per repeat, interleaved."""
    import statistics
    times = {n: [getattr(t, clock) for t in ts]
             for n, ts in call_times(fns, repeats, device).items()}
    return ({n: statistics.median(t) for n, t in times.items()},
            {n: min(t) for n, t in times.items()})


# ---------------------------------------------------------------- tiny stacks
# name -> the norm (kind, CBN arguments), the forward/backward calls per optimizer step,
# and the row whose host time it is compared with (BN with the same calls).
TINY_VARIANTS = {
    'BN': dict(kind='bn'),
    'GN': dict(kind='gn'),
    'CBN burn-in (acts as BN)': dict(kind='cbn', burn_in=True),
    'CBN default': dict(kind='cbn'),
    'CBN paper': dict(kind='cbn', cbn=dict(mode='paper')),
    'naive CBN (rho=0)': dict(kind='cbn', cbn=dict(rho=0.0)),
    'CBN default, dvar_stride=4': dict(kind='cbn', cbn=dict(dvar_stride=4)),
    f'BN, {ACCUMULATION_CALLS}-call accumulation': dict(kind='bn', calls=ACCUMULATION_CALLS),
    f'CBN default, {ACCUMULATION_CALLS}-call accumulation':
        dict(kind='cbn', calls=ACCUMULATION_CALLS, cbn=dict(per_call_windows=False)),
}


# The compiled rows: BN, and CBN at the layer's own window (4) and at the one CBNHook
# derives at 1 image per step (32), each trained over twice its window.
COMPILE_VARIANTS = {
    'BN': TINY_VARIANTS['BN'],
    'CBN default': TINY_VARIANTS['CBN default'],
    'CBN default, k = 32': dict(kind='cbn', cbn=dict(window_size=32)),
}


def baseline_of(name: str, variants: dict) -> str:
    """The BN row with the same calls per step."""
    calls = variants[name].get('calls', 1)
    return next(n for n, v in variants.items()
                if v['kind'] == 'bn' and v.get('calls', 1) == calls)


def make_norm(spec: dict, channels: int) -> nn.Module:
    kind = spec['kind']
    if kind == 'bn':
        return nn.BatchNorm2d(channels)
    if kind == 'gn':
        return nn.GroupNorm(spec.get('groups', TINY_GN_GROUPS), channels)
    layer = {'cbn': cbn_plugin.CBN, 'sync': cbn_plugin.SyncCBN}[kind]
    return layer(channels, **spec.get('cbn', {}))


def tiny_stack(layers: int, spec: dict, device) -> nn.Module:
    """``layers`` x (conv 1x1 8->8, the norm, ReLU), bound; burn-in variants act as BN."""
    blocks = []
    for _ in range(layers):
        blocks += [nn.Conv2d(CHANNELS, CHANNELS, 1, bias=False), make_norm(spec, CHANNELS),
                   nn.ReLU()]
    model = nn.Sequential(*blocks).to(device)
    cbn_plugin.bind(model, logger=None)
    if spec.get('burn_in'):
        for _, layer in cbn_plugin.cbn_layers(model):
            layer.set_schedule(burn_in_steps=10 ** 9)
    return model


def training_step(model: nn.Module, optimizer, inputs: torch.Tensor, calls: int = 1,
                  forward=None):
    """One optimizer step: zero_grad, ``calls`` x (forward, backward), SGD step,
    ``cbn_plugin.step``. ``forward`` (a compiled model) defaults to ``model``."""
    forward = forward or model

    def step():
        optimizer.zero_grad()
        for _ in range(calls):
            forward(inputs).sum().backward()
        optimizer.step()
        cbn_plugin.step(model)
    return step


def make_tiny(spec: dict, layers: int, device, seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_stack(layers, spec, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    inputs = torch.randn(1, CHANNELS, MAP, MAP, generator=torch.Generator().manual_seed(seed)
                         ).to(device)
    return model, optimizer, inputs


def warm_steps(spec: dict | None = None) -> int:
    """Steps before measuring: the window filled (4 by default) and one more."""
    return (spec or {}).get('cbn', {}).get('window_size', cbn_plugin.CBN(1).window_size) + 1


def warmed_tiny(spec: dict, layers: int, device):
    """A tiny stack of ``layers`` conv+norm layers, its optimizer, and its training step
    (``spec['calls']`` forwards), warmed up: ``(model, optimizer, step)``."""
    model, optimizer, inputs = make_tiny(spec, layers, device)
    step = training_step(model, optimizer, inputs, spec.get('calls', 1))
    for _ in range(warm_steps()):
        step()
    return model, optimizer, step


def tiny_rows(variants: dict, args, device) -> tuple[list[dict], dict]:
    """Per variant: aten ops and host time per conv+norm layer per step, kernels (CUDA),
    peak memory of a step of the deep stack. Also the per-layer op counts by name."""
    shallow, deep = args.host_layers
    built = {(name, layers): warmed_tiny(spec, layers, device)
             for name, spec in variants.items() for layers in (shallow, deep)}
    fns = {key: step for key, (_, _, step) in built.items()}
    times = time_interleaved(fns, args.host_repeats, args.host_steps, device)
    rows, per_layer_ops = [], {}
    span = deep - shallow
    for name in variants:
        ops = {layers: count_ops(built[name, layers][2]) for layers in (shallow, deep)}
        per_layer_ops[name] = per_layer(ops)
        model, optimizer, step = built[name, deep]
        kernels = {layers: device_kernels(built[name, layers][2], device)
                   for layers in (shallow, deep)}
        rows.append(dict(
            norm=name, calls=variants[name].get('calls', 1),
            ops_per_layer=(sum(ops[deep].values()) - sum(ops[shallow].values())) / span,
            ops_per_step_deep=sum(ops[deep].values()),
            host_us_per_layer=(times[name, deep] - times[name, shallow]) / span * 1e6,
            step_us_shallow=times[name, shallow] * 1e6, step_us_deep=times[name, deep] * 1e6,
            kernels_per_layer=(None if kernels[deep] is None
                               else (kernels[deep] - kernels[shallow]) / span),
            step_peak_kib=_scaled(step_peak_bytes(step, device), 1024),
            persistent_kib=persistent_bytes(model, optimizer) / 1024))
    by_name = {r['norm']: r for r in rows}
    for row in rows:
        base = by_name.get(baseline_of(row['norm'], variants)) if row['norm'] in variants \
            else None
        if base is not None:
            row['baseline'] = base['norm']
            row['host_ratio'] = row['host_us_per_layer'] / base['host_us_per_layer']
            row['ops_ratio'] = row['ops_per_layer'] / base['ops_per_layer']
    return rows, per_layer_ops


def site_rows(args, device, name: str = 'CBN default') -> list[tuple[str, float]]:
    """Ops per layer per step of ``name`` by the plugin function that issues them (deep
    minus shallow stack, as the op counts), most first."""
    per = per_layer({layers: count_ops(warmed_tiny(TINY_VARIANTS[name], layers, device)[2],
                                       issuing_site) for layers in args.host_layers})
    return sorted(((site, n) for site, n in per.items() if n), key=lambda t: (-t[1], t[0]))


def top_ops(per_layer: dict, limit: int = 15) -> list[tuple[str, float]]:
    return sorted(((op, n) for op, n in per_layer.items() if n), key=lambda t: (-t[1], t[0])
                  )[:limit]


# ---------------------------------------------------------------- torch.compile
class _RecompileLimitLog(logging.Handler):
    """Catches dynamo's 'hit config.recompile_limit' warning (its fall back to eager)."""

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if 'recompile_limit' in message and 'hit config' in message:
            self.hits.append(message.splitlines()[0])


def compile_rows(args, device) -> dict:
    """BN and CBN default stacks under ``torch.compile``: graphs, fallbacks, breaks, time.

    One compiled model at a time, dynamo reset before each: dynamo's cache and its
    recompile limit are per code object, which every ``nn.Sequential`` shares. Each is
    timed interleaved with its eager twin; per layer from the two depths, as in eager.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters
    shallow, deep = args.host_layers
    out = dict(backend=args.compile_backend, steps=args.compile_steps,
               recompile_limit=torch._dynamo.config.recompile_limit, rows=[])
    log = logging.getLogger('torch._dynamo')
    for name, spec in COMPILE_VARIANTS.items():
        # at least twice the window: the graphs of every phase, the full window's included
        steps = max(args.compile_steps, 2 * (warm_steps(spec) - 1))
        row = dict(norm=name, steps=steps)
        out['rows'].append(row)
        times = {}
        try:
            for layers in (shallow, deep):
                torch._dynamo.reset()
                counters.clear()
                handler = _RecompileLimitLog()
                log.addHandler(handler)
                try:
                    model, optimizer, inputs = make_tiny(spec, layers, device)
                    compiled = torch.compile(model, backend=args.compile_backend)
                    step = training_step(model, optimizer, inputs, forward=compiled)
                    graphs, start = [], time.perf_counter()
                    for _ in range(steps):
                        step()
                        graphs.append(counters['stats']['unique_graphs'])
                    seconds = time.perf_counter() - start
                    e_model, e_opt, e_inputs = make_tiny(spec, layers, device)
                    eager = training_step(e_model, e_opt, e_inputs)
                    for _ in range(warm_steps(spec)):
                        eager()
                    best = time_interleaved({'compiled': step, 'eager': eager},
                                            args.host_repeats, args.host_steps, device)
                finally:
                    log.removeHandler(handler)
                times[layers] = best
                half = steps // 2
                row[f'layers_{layers}'] = dict(
                    graphs=graphs[-1], graphs_by_step=graphs,
                    new_graphs_in_second_half=graphs[-1] - graphs[half - 1] if half else None,
                    graphs_after_timing=counters['stats']['unique_graphs'],
                    steps_in_all=steps + args.host_repeats * args.host_steps,
                    frames_total=counters['frames']['total'], frames_ok=counters['frames']['ok'],
                    recompile_limit_hits=len(handler.hits),
                    graph_breaks_counted=sum(counters['graph_break'].values()),
                    compile_and_train_s=seconds,
                    compiled_step_us=best['compiled'] * 1e6, eager_step_us=best['eager'] * 1e6)
            for mode in ('compiled', 'eager'):
                row[f'{mode}_us_per_layer'] = ((times[deep][mode] - times[shallow][mode])
                                               / (deep - shallow) * 1e6)
            # Graph breaks of one training-mode forward, the window filled (a fresh
            # layer's first step takes BN's path).
            torch._dynamo.reset()
            model, optimizer, inputs = make_tiny(spec, shallow, device)
            warm = training_step(model, optimizer, inputs)
            for _ in range(warm_steps(spec)):
                warm()
            explained = torch._dynamo.explain(model)(inputs)
            row.update(explain_graphs=explained.graph_count,
                       explain_graph_breaks=explained.graph_break_count,
                       break_reasons=[str(r.reason).splitlines()[0][:300]
                                      for r in explained.break_reasons])
        except Exception as exc:  # measured whatever the layer does: the failure is the figure
            row['error'] = f'{type(exc).__name__}: {str(exc).splitlines()[0][:300]}'
            row['traceback'] = traceback.format_exc(limit=4)[-2000:]
    torch._dynamo.reset()
    return out


# ---------------------------------------------------------------- SyncCBN, 2 processes
SYNC_VARIANTS = {
    'BN (each process alone)': dict(kind='bn'),
    'CBN default (each process alone)': dict(kind='cbn'),
    'SyncCBN default (2 processes)': dict(kind='sync'),
}


def _sync_worker(rank, world, port, args, device_type, queue):
    import torch.distributed as dist
    torch.set_num_threads(args.threads)
    try:
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                                world_size=world)
        rows, _ = tiny_rows(SYNC_VARIANTS, args, torch.device(device_type))
        dist.destroy_process_group()
        queue.put((rank, rows, None))
    except Exception:
        queue.put((rank, None, traceback.format_exc(limit=6)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def sync_rows(args, device) -> dict:
    """SyncCBN over 2 gloo processes (CPU), beside BN and CBN in the same processes;
    the figures are rank 0's."""
    import torch.multiprocessing as mp
    if device.type != 'cpu':
        return dict(error='SyncCBN is measured over gloo on the CPU only')
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_sync_worker, args=(rank, 2, port, args, 'cpu', queue))
             for rank in range(2)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + args.sync_timeout
    import queue as queue_module
    try:
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                rank, rows, error = queue.get(timeout=2)
                results[rank] = (rows, error)
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and i not in results]
                if dead:  # a worker died without a word (e.g. killed)
                    results[dead[0]] = (None, f'SyncCBN worker {dead[0]} exited with code '
                                              f'{procs[dead[0]].exitcode}')
                    break
        else:
            if len(results) < len(procs):
                results.setdefault(0, (None, f'no result within {args.sync_timeout:g} s'))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    rows, error = results.get(0, (None, 'rank 0 returned nothing'))
    errors = [e for _, e in results.values() if e]
    return dict(rows=rows, error=errors[0] if errors else error) if errors or rows is None \
        else dict(rows=rows)


# ---------------------------------------------------------------- detectors
DIGITS_VARIANTS = {
    'BN': dict(type='BN', requires_grad=True),
    'GN': dict(type='GN', num_groups=DIGITS_GN_GROUPS, requires_grad=True),
    'CBN burn-in (acts as BN)': dict(type='CBN', window_size=DIGITS_WINDOW),
    'CBN default': dict(type='CBN', window_size=DIGITS_WINDOW),
    f'CBN default, window {DIGITS_DERIVED_WINDOW} (derived at 1 image)': dict(
        type='CBN', window_size=DIGITS_DERIVED_WINDOW),
    'CBN paper': dict(type='CBN', window_size=DIGITS_WINDOW, mode='paper'),
    'naive CBN (rho=0)': dict(type='CBN', window_size=DIGITS_WINDOW, rho=0.0),
    'CBN default, dvar_stride=4': dict(type='CBN', window_size=DIGITS_WINDOW, dvar_stride=4),
}


def digits_detector(norm_cfg: dict, device, width: int | None = None):
    """The study's Faster R-CNN (ResNet-18 layout, width 32, FPN, 4conv1fc head) with
    ``norm_cfg`` in every norm layer, as the study builds its rows."""
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(str(DIGITS_CONFIG))
    m = cfg.model
    if width is not None:  # a narrower model for the tests
        m.backbone.base_channels = m.backbone.stem_channels = width
        m.neck.in_channels = [width, 2 * width, 4 * width, 8 * width]
        m.neck.out_channels = m.rpn_head.in_channels = m.rpn_head.feat_channels = 2 * width
        m.roi_head.bbox_roi_extractor.out_channels = 2 * width
        m.roi_head.bbox_head.in_channels = m.roi_head.bbox_head.conv_out_channels = 2 * width
        m.roi_head.bbox_head.fc_out_channels = 8 * width
    for part in (m.backbone, m.neck, m.roi_head.bbox_head):
        part.norm_cfg = dict(norm_cfg)
    return MODELS.build(m).to(device)


def digits_batch(device, images: int = 1, size: int = DIGITS_CANVAS):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    return demo_mm_inputs(images, (3, size, size), num_items=[4] * images, num_classes=10,
                          device=str(device))


def detector_training_step(model, batch, burn_in: bool = False):
    """A training step of an mmdet detector (SGD momentum, ``cbn_plugin.step``); with
    ``burn_in`` its CBN layers act as BN throughout."""
    cbn_plugin.bind(model, logger=None)
    if burn_in:
        for _, layer in cbn_plugin.cbn_layers(model):
            layer.set_schedule(burn_in_steps=10 ** 9)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    data = model.data_preprocessor(batch, True)

    def step():
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cbn_plugin.step(model)
    return optimizer, step


def detector_rows(builders: dict, args, device, repeats: int, baselines=('BN', 'GN')) -> list:
    """Ops, kernels, step time (median and fastest, interleaved) and step peak memory of
    each detector ``builders[name]() -> (model, optimizer, step)``."""
    built = {}
    for name, build in builders.items():
        model, optimizer, step = build()
        for _ in range(warm_steps()):
            step()
        built[name] = (model, optimizer, step)
        print(f'    built and warmed {name}', flush=True)
    median, fastest = median_and_fastest({n: b[2] for n, b in built.items()}, repeats, device)
    rows = []
    for name, (model, optimizer, step) in built.items():
        row = dict(norm=name, ops_per_step=sum(count_ops(step).values()),
                   kernels_per_step=device_kernels(step, device),
                   s_median=median[name], s_fastest=fastest[name],
                   step_peak_mib=_scaled(step_peak_bytes(step, device), 2 ** 20),
                   persistent_mib=persistent_bytes(model, optimizer) / 2 ** 20,
                   norm_layers=sum(1 for m in model.modules()
                                   if isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                     nn.GroupNorm))))
        for base in baselines:
            if base in built:
                row[f'vs_{base}_median'] = median[name] / median[base]
                row[f'vs_{base}_fastest'] = fastest[name] / fastest[base]
        rows.append(row)
    return rows


def digits_rows(args, device) -> list:
    def builder(name, cfg):
        def build():
            torch.manual_seed(0)
            model = digits_detector(cfg, device, args.digits_width)
            optimizer, step = detector_training_step(model, digits_batch(device),
                                                     burn_in='burn-in' in name)
            return model, optimizer, step
        return build
    return detector_rows({n: builder(n, c) for n, c in DIGITS_VARIANTS.items()}, args, device,
                         args.digits_repeats)


def r50_rows(args, device, detector_step) -> list:
    """benchmark.py's R50-FPN training step (norm in FPN + box head): BN and CBN default."""
    def builder(name):
        def build():
            model, step = detector_step(name, args, device)
            return model, step.optimizer, step
        return build
    return detector_rows({n: builder(n) for n in ('BN', 'CBN default')}, args, device,
                         args.r50_repeats, baselines=('BN',))


# ---------------------------------------------------------------- the section
def layer_state() -> dict:
    """Which layer was measured: the commit of cbn_plugin and whether it had local changes."""
    import subprocess
    def git(*cmd):
        try:
            return subprocess.run(['git', *cmd], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ''
    return dict(commit=git('rev-parse', '--short', 'HEAD') or 'unknown (not a git checkout)',
                uncommitted_layer_changes=bool(git('status', '--porcelain', '--', 'cbn_plugin')))


def run(args, device, detector_step=None) -> dict:
    """The whole host section, one record (the json keeps it under ``args.record``)."""
    record = dict(device=str(device), layer=layer_state(), layers=list(args.host_layers),
                  repeats=args.host_repeats, steps=args.host_steps, threads=torch.get_num_threads())
    print('  tiny stacks', flush=True)
    record['tiny'], per_layer_ops = tiny_rows(TINY_VARIANTS, args, device)
    record['top_ops'] = {n: top_ops(per_layer_ops[n], args.top_ops)
                         for n in ('BN', 'CBN default')}
    record['per_layer_ops'] = per_layer_ops
    record['sites'] = site_rows(args, device)
    for part, flag, fn in (('compile', 'host_compile', lambda: compile_rows(args, device)),
                           ('sync', 'host_sync', lambda: sync_rows(args, device)),
                           ('digits', 'host_digits', lambda: digits_rows(args, device)),
                           ('r50', 'host_r50', lambda: r50_rows(args, device, detector_step))):
        if not getattr(args, flag):
            continue
        print(f'  {part}', flush=True)
        try:
            record[part] = fn()
        except Exception as exc:  # one part failing leaves the others measured
            record[part] = dict(error=f'{type(exc).__name__}: {exc}'[:500],
                                traceback=traceback.format_exc(limit=6)[-2000:])
    return record


# ---------------------------------------------------------------- targets and report
def _row(rows, name):
    if not isinstance(rows, list):
        return None
    return next((r for r in rows if r['norm'] == name), None)


def peak_total(row, unit):
    peak = row.get(f'step_peak_{unit}')
    return None if peak is None else peak + row[f'persistent_{unit}']


def targets(record: dict, baseline: dict | None) -> list[tuple[str, bool | None, str]]:
    """``(target, met, measured)`` for the defaults; ``met`` None where not measured."""
    out = []
    cbn, bn = _row(record.get('tiny'), 'CBN default'), _row(record.get('tiny'), 'BN')
    if cbn and bn:
        ops = cbn['ops_per_layer']
        out.append((f'CBN default: <= {TARGET_OPS_PER_LAYER} aten ops per layer per step',
                    ops <= TARGET_OPS_PER_LAYER,
                    f'{ops:.0f} ops ({ops / TARGET_OPS_PER_LAYER:.2f}x the target; BN '
                    f'{bn["ops_per_layer"]:.0f})'))
        ratio = cbn['host_ratio']
        out.append((f'CBN default: <= {TARGET_HOST_RATIO:g}x BN\'s host time per layer per step',
                    ratio <= TARGET_HOST_RATIO,
                    f'{ratio:.2f}x BN ({cbn["host_us_per_layer"]:.0f} us vs '
                    f'{bn["host_us_per_layer"]:.0f} us; {ratio / TARGET_HOST_RATIO:.2f}x the target)'))
    digits = _row(record.get('digits'), 'CBN default')
    if digits:
        ratio = digits['vs_BN_fastest']
        out.append((f'Digits detector, every norm CBN default: <= {TARGET_DIGITS_RATIO:g}x BN\'s '
                    'step', ratio <= TARGET_DIGITS_RATIO,
                    f'{ratio:.3f}x (fastest steps), {digits["vs_BN_median"]:.3f}x (medians)'))
    else:
        out.append(('Digits detector target', None, 'not measured in this run'))
    r50 = _row(record.get('r50'), 'CBN default')
    if r50:
        ratio = r50['vs_BN_fastest']
        out.append((f'R50-FPN step, CBN default in FPN + head: <= {TARGET_R50_RATIO:g}x BN',
                    ratio <= TARGET_R50_RATIO,
                    f'{ratio:.3f}x (fastest steps), {r50["vs_BN_median"]:.3f}x (medians)'))
    else:
        out.append(('R50-FPN target', None, 'not measured in this run'))
    if baseline is None or baseline is record:
        out.append(('Peak memory not above the layer before its rewrite', None,
                    'this run is the reference the next runs are compared with'))
    else:
        for part, unit in (('tiny', 'kib'), ('digits', 'mib'), ('r50', 'mib')):
            now, before = _row(record.get(part), 'CBN default'), _row(baseline.get(part),
                                                                     'CBN default')
            if now and before and None not in (peak_total(now, unit), peak_total(before, unit)):
                a, b = peak_total(now, unit), peak_total(before, unit)
                label = {'kib': 'KiB', 'mib': 'MiB'}[unit]
                out.append((f'Peak memory of a CBN default step ({part}: step peak + persistent) '
                            'not above before', a <= b,
                            f'{a:,.1f} {label} vs {b:,.1f} {label} before ({a / b:.3f}x)'))
    return out


def _fmt(value, spec):
    return '-' if value is None else format(value, spec)


def render(name: str, record: dict, baseline: dict | None, run_text: str = '') -> list[str]:
    """The markdown of one record (``run_text``: the run that made it); beside the
    baseline's figures when given."""
    cuda = record['device'].startswith('cuda')
    before = baseline is not None and baseline is not record
    shallow, deep = record['layers']
    lines = [f'### Host overhead: {name}', ''] + ([run_text, ''] if run_text else []) + [
             f'Layer measured: commit {record["layer"]["commit"]}'
             + (' with uncommitted changes to cbn_plugin' if record['layer'][
                 'uncommitted_layer_changes'] else '')
             + f'; device {record["device"]}, {record["threads"]} torch thread(s). Per conv+norm '
             f'layer per step = (step of {deep} layers - step of {shallow} layers) / '
             f'{deep - shallow}; host time: the fastest of {record["repeats"]} interleaved repeats '
             f'of {record["steps"]} steps.', '']
    if not cuda:
        lines += ['CPU only: no GPU on the machine that produced this record. On the CPU the '
                  'host time is the whole step; most dispatched ops would be a kernel launch '
                  'on a GPU.', '']
    lines += ['#### Targets (the defaults)', '']
    for target, met, measured in targets(record, baseline):
        mark = 'not measured' if met is None else ('PASS' if met else 'FAIL')
        lines.append(f'- {mark}: {target}: {measured}')
    head = ('| norm (1x8x4x4, conv 1x1 8->8) | calls/step | aten ops per layer per step | '
            + ('before | ' if before else '')
            + 'ops vs BN | host us per layer per step | vs BN (same calls) | '
            + ('before vs BN | ' if before else '')
            + ('kernels per layer per step | ' if cuda else '')
            + f'step peak KiB ({deep} layers) | persistent KiB |')
    lines += ['', '#### Tiny stacks', '', head, '|' + '---|' * (head.count('|') - 1)]
    for r in record.get('tiny', []):
        old = _row(baseline.get('tiny'), r['norm']) if before else None
        cells = [r['norm'], str(r['calls']), f'{r["ops_per_layer"]:.0f}']
        if before:
            cells.append(_fmt(old and old['ops_per_layer'], '.0f'))
        cells += [f'{r["ops_ratio"]:.1f}x', f'{r["host_us_per_layer"]:.0f}',
                  f'{r["host_ratio"]:.2f}x']
        if before:
            cells.append(_fmt(old and old['host_ratio'], '.2f'))
        if cuda:
            cells.append(_fmt(r['kernels_per_layer'], '.0f'))
        cells += [_fmt(r['step_peak_kib'], '.1f'), f'{r["persistent_kib"]:.1f}']
        lines.append('| ' + ' | '.join(cells) + ' |')
    if record.get('top_ops'):
        lines += ['', '#### Top aten ops per layer per step', '',
                  '| op | CBN default | BN |', '|---|---|---|']
        bn_ops = dict(record['top_ops'].get('BN', []))
        per_bn = record.get('per_layer_ops', {}).get('BN', bn_ops)
        for op, n in record['top_ops']['CBN default']:
            lines.append(f'| {op} | {n:.0f} | {per_bn.get(op, 0):.0f} |')
    if record.get('sites'):
        lines += ['', '#### Where the ops of a CBN default layer step are issued', '',
                  'Per layer per step, by the innermost `cbn_plugin` function on the Python '
                  'stack when the op is dispatched (`module.function`); the conv, ReLU, loss '
                  'and optimizer ops of the layer are outside the plugin. Most of the '
                  'rest is per-channel arithmetic on `C`- and `K x C`-sized tensors (the '
                  'pool, its written-out backward, the normalisation\'s backward, the '
                  'running statistics, the window\'s write): each op is one dispatch and, '
                  'on a GPU, one launch. Fewer of them takes fusing them, by a custom '
                  'kernel or by `torch.compile` (the table after this one).', '',
                  '| issued by | ops per layer per step |', '|---|---|']
        lines += [f'| {site} | {n:.0f} |' for site, n in record['sites']]
    lines += _render_compile(record.get('compile'))
    lines += _render_sync(record.get('sync'), cuda)
    lines += _render_detector('Digits detector, every norm swapped (the small-batch detection '
                              'study\'s Faster R-CNN R18-w32 FPN 4conv1fc, 1 image of 128x128 '
                              'with 4 random boxes, window 4 unless the row names another)',
                              record.get('digits'),
                              ('BN', 'GN'), cuda, baseline.get('digits') if before else None)
    lines += _render_detector('R50-FPN detector, norm in FPN + box head (part 2\'s setting)',
                              record.get('r50'), ('BN',), cuda,
                              baseline.get('r50') if before else None)
    return lines


def _render_compile(comp) -> list[str]:
    if not comp:
        return []
    lines = ['', f'#### torch.compile (backend {comp["backend"]!r}, at least {comp["steps"]} '
             'training steps per stack and twice its window, dynamo recompile_limit '
             f'{comp["recompile_limit"]})', '',
             'Graphs, recompile-limit fallbacks and graph breaks are dynamo\'s, the same '
             'for every backend; the host time is the backend\'s (`--compile-backend`, '
             'inductor by default). A stack that keeps compiling new graphs until the limit '
             'runs eager from then on.', '',
             '| norm | host us per layer step, compiled | eager | compiled / eager | '
             'steps compiled | graphs compiled in those steps (shallow, deep stack) | new '
             'graphs in their second half | graphs after all steps (timing included) | '
             'recompile-limit fallbacks to eager | graph breaks (explain) | note |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in comp['rows']:
        stacks = [v for k, v in sorted(r.items()) if k.startswith('layers_')]
        compiled, eager = r.get('compiled_us_per_layer'), r.get('eager_us_per_layer')
        note = r.get('error', '') or '; '.join(r.get('break_reasons', []))
        lines.append('| ' + ' | '.join([
            r['norm'], _fmt(compiled, '.0f'), _fmt(eager, '.0f'),
            _fmt(compiled / eager if compiled and eager else None, '.2f'),
            str(r.get('steps', comp['steps'])),
            ', '.join(str(s['graphs']) for s in stacks) or '-',
            ', '.join(str(s['new_graphs_in_second_half']) for s in stacks) or '-',
            ', '.join(f'{s["graphs_after_timing"]} in {s["steps_in_all"]} steps' for s in stacks)
            or '-',
            ', '.join(str(s['recompile_limit_hits']) for s in stacks) or '-',
            _fmt(r.get('explain_graph_breaks'), 'd'), note.replace('|', '/')]) + ' |')
    return lines


def _render_sync(sync_result, cuda) -> list[str]:
    if not sync_result:
        return []
    lines = ['', '#### SyncCBN, 2 gloo processes on the CPU (rank 0\'s figures)', '']
    if sync_result.get('error'):
        lines.append(f'Failed: `{sync_result["error"].strip().splitlines()[-1]}`')
        return lines
    lines += ['| norm | aten ops per layer per step | host us per layer per step | vs BN |',
              '|---|---|---|---|']
    for r in sync_result['rows']:
        lines.append(f'| {r["norm"]} | {r["ops_per_layer"]:.0f} | {r["host_us_per_layer"]:.0f} '
                     f'| {r["host_ratio"]:.2f}x |')
    return lines


def _render_detector(title, rows, baselines, cuda, before) -> list[str]:
    if not rows:
        return []
    lines = ['', f'#### {title}', '']
    if isinstance(rows, dict) and rows.get('error'):
        return lines + [f'Failed: `{rows["error"].strip().splitlines()[0]}`']
    head = ['norm', 'aten ops per step'] + (['before'] if before else []) \
        + (['kernels per step'] if cuda else []) + ['s/step (fastest)']
    for base in baselines:
        head += [f'vs {base} (fastest)', f'vs {base} (median)']
    head += ['step peak MiB', 'persistent MiB'] + (['peak + persistent before'] if before else [])
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        old = _row(before, r['norm']) if before else None
        cells = [r['norm'], f'{r["ops_per_step"]:,}']
        if before:
            cells.append(_fmt(old and old['ops_per_step'], ','))
        if cuda:
            cells.append(_fmt(r['kernels_per_step'], ','))
        cells.append(f'{r["s_fastest"]:.3f}')
        for base in baselines:
            cells += [_fmt(r.get(f'vs_{base}_fastest'), '.3f'),
                      _fmt(r.get(f'vs_{base}_median'), '.3f')]
        cells += [_fmt(r['step_peak_mib'], '.1f'), f'{r["persistent_mib"]:.1f}']
        if before:
            cells.append(_fmt(old and peak_total(old, 'mib'), '.1f'))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines
