"""Communication cost of SyncCBN against CBN per training step, measured on gloo processes.

For the paper's placement (the 8 FPN convs and the 4 box-head convs of Faster
R-CNN R50-FPN 4conv1fc, 256 channels each), every layer is run as conv + norm,
forward, backward and window step, in several variants side by side:

- ``BN``: ``nn.BatchNorm2d`` (no communication);
- ``SyncBN``: SyncCBN with ``window_size=1`` (exactly SyncBN: one all-reduce of
  ``1 + 2C`` numbers in the forward, ``2C`` in the backward);
- ``CBN``: window 4, rho 1 (no communication);
- ``SyncCBN``: window 4, rho 1 (one all-reduce of ``1 + 2C + P + |W|`` numbers
  in the forward, ``2C`` in the backward).

Measured, in one run: the all-reduce calls and their sizes (by counting the
calls ``torch.distributed.all_reduce`` receives during one step, not by
formula), the time of a layer step per variant (median over repeats, the
variants interleaved repeat by repeat so that machine load hits them alike;
the slowest rank's median), the time of a bare ``all_reduce`` of each payload,
and, for scale, the bare all-reduce of the model's gradient, which DDP does
every step whatever the norm (Faster R-CNN R50-FPN 4conv1fc's trainable
parameters; ``--no-ddp-reference`` skips building it).

The payload depends only on the channels and the conv; the compute depends on
the feature-map sizes, which are shrunk by default (``--image``, ``--rois``)
so that a CPU run takes about a minute: the differences in milliseconds carry
over to real sizes on the same interconnect, the ratios do not.

    .venv/bin/python tools/analysis_tools/measure_comm.py   # spawns 2 CPU processes (gloo)
    .venv/bin/python tools/analysis_tools/measure_comm.py --out docs/scaling_comm.json
    torchrun --nproc_per_node 8 tools/analysis_tools/measure_comm.py --backend nccl --device cuda
    # several nodes: torchrun --nnodes N --node_rank R --master_addr A ... (same arguments)

Prints Markdown tables (``docs/scaling.md`` quotes two runs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import cbn_plugin  # noqa: E402
from cbn_plugin import CBN, SyncCBN  # noqa: E402

CONFIG = ROOT / 'configs' / 'cbn' / 'faster-rcnn_r50_fpn_4conv1fc-cbn_1x_coco.py'
CHANNELS = 256
# ResNet-50 stage widths feeding the FPN's lateral convs, and their strides.
BACKBONE = ((256, 4), (512, 8), (1024, 16), (2048, 32))
VARIANTS = ('BN', 'SyncBN', 'CBN', 'SyncCBN')


def layer_specs(image: tuple[int, int], images: int, rois: int) -> list[dict]:
    """The 12 layers of the paper's placement (the 4 box-head convs share one shape)."""
    h, w = image
    specs = []
    for i, (cin, stride) in enumerate(BACKBONE):
        size = (max(1, h // stride), max(1, w // stride))
        specs.append(dict(name=f'fpn.lateral{i}', cin=cin, kernel=1, batch=images, size=size,
                          count=1))
    for i, (_, stride) in enumerate(BACKBONE):
        size = (max(1, h // stride), max(1, w // stride))
        specs.append(dict(name=f'fpn.output{i}', cin=CHANNELS, kernel=3, batch=images,
                          size=size, count=1))
    specs.append(dict(name='bbox_head.conv (x4)', cin=CHANNELS, kernel=3, batch=images * rois,
                      size=(7, 7), count=4))
    return specs


class ConvNorm(nn.Module):
    def __init__(self, spec: dict, variant: str):
        super().__init__()
        k = spec['kernel']
        self.conv = nn.Conv2d(spec['cin'], CHANNELS, k, padding=k // 2, bias=False)
        if variant == 'BN':
            self.bn = nn.BatchNorm2d(CHANNELS)
        elif variant == 'SyncBN':
            self.bn = SyncCBN(CHANNELS, window_size=1)
        elif variant == 'CBN':
            self.bn = CBN(CHANNELS, window_size=4, rho=1.0)
        else:
            self.bn = SyncCBN(CHANNELS, window_size=4, rho=1.0)

    def forward(self, x):
        return self.bn(self.conv(x))


class AllReduceCounter:
    """Counts the ``torch.distributed.all_reduce`` calls in a block, their sizes and time.

    The layers look ``all_reduce`` up on ``torch.distributed`` at call time, so
    wrapping the module attribute sees every call they make. ``seconds`` is
    the wall time spent inside the calls: the transfer plus any wait for the
    other ranks to arrive.
    """

    def __init__(self, device: str = 'cpu'):
        self.calls: list[int] = []
        self.seconds = 0.0
        self.device = device

    def __enter__(self):
        self._orig = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            self.calls.append(tensor.numel())
            sync(self.device)
            start = time.perf_counter()
            out = self._orig(tensor, *args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            return out

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def make_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, opt):
    def step():
        out = model(x)
        out.backward(grad)
        opt.step()
        opt.zero_grad(set_to_none=False)
        cbn_plugin.step(model)
    return step


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def slowest(value: float, device: str) -> float:
    """The largest value over the ranks (the step waits for the slowest)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure_layer(spec: dict, args, rank: int) -> dict:
    device = args.device
    gen = torch.Generator().manual_seed(1000 + rank)  # different data per rank
    x = torch.randn(spec['batch'], spec['cin'], *spec['size'], generator=gen).to(device)
    grad = torch.randn(spec['batch'], CHANNELS, *spec['size'], generator=gen).to(device)
    steps, calls = {}, {}
    for variant in VARIANTS:
        torch.manual_seed(0)  # the same weights on every rank
        model = ConvNorm(spec, variant).to(device).train()
        cbn_plugin.bind(model, logger=None)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        step = make_step(model, x, grad, opt)
        for _ in range(args.warmup):  # fills the window (no burn-in)
            step()
        with AllReduceCounter() as counter:
            step()
        calls[variant] = counter.calls
        steps[variant] = step
    times = {v: [] for v in VARIANTS}
    inside = {v: [] for v in VARIANTS}
    dist.barrier()
    for _ in range(args.repeats):
        for variant in VARIANTS:  # interleaved
            with AllReduceCounter(device) as counter:
                times[variant].append(timed(steps[variant], device))
            inside[variant].append(counter.seconds)
    payloads = sorted({n for c in calls.values() for n in c}, reverse=True)
    bare = {}
    for n in payloads:
        buf = torch.zeros(n, device=device)
        for _ in range(2):
            dist.all_reduce(buf)
        bare[n] = [timed(lambda: dist.all_reduce(buf), device) for _ in range(args.repeats)]
    return dict(
        name=spec['name'], count=spec['count'], cin=spec['cin'], kernel=spec['kernel'],
        input=[spec['batch'], spec['cin'], *spec['size']],
        calls=calls,
        step_ms={v: 1e3 * slowest(statistics.median(t), device) for v, t in times.items()},
        in_all_reduce_ms={v: 1e3 * slowest(statistics.median(t), device)
                          for v, t in inside.items()},
        all_reduce_ms={n: 1e3 * slowest(statistics.median(t), device) for n, t in bare.items()})


def ddp_gradient_numel() -> int:
    """Trainable parameters of Faster R-CNN R50-FPN 4conv1fc with CBN (what DDP all-reduces)."""
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure_ddp(numel: int, args) -> float:
    buf = torch.zeros(numel, device=args.device)
    dist.all_reduce(buf)
    times = [timed(lambda: dist.all_reduce(buf), args.device) for _ in range(args.ddp_repeats)]
    return 1e3 * slowest(statistics.median(times), args.device)


def run(rank: int, world: int, args) -> dict | None:
    torch.set_num_threads(args.threads)
    layers = [measure_layer(spec, args, rank)
              for spec in layer_specs(tuple(args.image), args.images, args.rois)]
    load_before = os.getloadavg()[0]
    result = dict(world_size=world, backend=dist.get_backend(), device=args.device,
                  threads=args.threads, image=list(args.image), images=args.images,
                  rois=args.rois, repeats=args.repeats, layers=layers,
                  torch=torch.__version__, machine=platform.machine(),
                  cpus=os.cpu_count(), when=datetime.datetime.now().isoformat(timespec='seconds'))
    if args.ddp_reference:
        numel = ddp_gradient_numel()
        result['ddp'] = dict(numel=numel, all_reduce_ms=measure_ddp(numel, args))
    result['load_average'] = [load_before, os.getloadavg()[0]]
    return result if rank == 0 else None


def totals(result: dict) -> dict:
    """Per training step over the 12 layers: calls, numbers all-reduced, times."""
    out = {}
    for v in VARIANTS:
        def total(get):
            return sum(layer['count'] * get(layer) for layer in result['layers'])
        out[v] = dict(
            calls=total(lambda l: len(l['calls'][v])),
            numbers=total(lambda l: sum(l['calls'][v])),
            in_all_reduce_ms=total(lambda l: l['in_all_reduce_ms'][v]),
            all_reduce_ms=total(lambda l: sum(l['all_reduce_ms'][n] for n in l['calls'][v])),
            step_ms=total(lambda l: l['step_ms'][v]))
    return out


def report(result: dict) -> str:
    load = ', '.join(f'{x:.1f}' for x in result['load_average'])
    lines = [f"{result['world_size']} processes, backend {result['backend']}, device "
             f"{result['device']}, {result['threads']} thread(s) each, torch {result['torch']}, "
             f"{result['cpus']} CPUs, load average before/after {load}; feature maps of a "
             f"{result['image'][0]}x{result['image'][1]} image, {result['images']} images and "
             f"{result['rois']} RoIs per image per process; medians of {result['repeats']} "
             'repeats, slowest rank.', '',
             'Communication per layer and step (forward + backward all-reduce; "in all-reduce":'
             ' wall time inside the calls during a training step, waiting for the other ranks'
             ' included; "bare": the same payloads all-reduced alone):', '',
             '| layer | conv, input per process | SyncBN numbers | SyncCBN numbers '
             '| SyncBN in all-reduce ms | SyncCBN in all-reduce ms '
             '| SyncCBN bare all-reduce ms |', '|---|---|---|---|---|---|---|']
    for l in result['layers']:
        shape = 'x'.join(map(str, l['input']))
        conv = f"{l['cin']}->256 {l['kernel']}x{l['kernel']}, {shape}"
        bare = sum(l['all_reduce_ms'][n] for n in l['calls']['SyncCBN'])
        inside = l['in_all_reduce_ms']
        lines.append(
            f"| {l['name']} | {conv} | {' + '.join(map(str, l['calls']['SyncBN']))} "
            f"| {' + '.join(map(str, l['calls']['SyncCBN']))} | {inside['SyncBN']:.2f} "
            f"| {inside['SyncCBN']:.2f} | {bare:.2f} |")
    lines += ['', 'Layer step (conv + norm forward, backward, SGD step, window step) in ms:', '',
              '| layer | BN | SyncBN | CBN | SyncCBN | SyncBN - BN | SyncCBN - CBN |',
              '|---|---|---|---|---|---|---|']
    for l in result['layers']:
        ms = l['step_ms']
        lines.append(f"| {l['name']} | {ms['BN']:.2f} | {ms['SyncBN']:.2f} | {ms['CBN']:.2f} "
                     f"| {ms['SyncCBN']:.2f} | {ms['SyncBN'] - ms['BN']:+.2f} "
                     f"| {ms['SyncCBN'] - ms['CBN']:+.2f} |")
    tot = totals(result)
    lines += ['', 'Per training step, the 12 layers (the box-head layer counted 4 times):', '',
              '| variant | all-reduce calls | numbers all-reduced | MB (float32) '
              '| in all-reduce ms | bare all-reduces ms | layer steps ms |',
              '|---|---|---|---|---|---|---|']
    for v in VARIANTS:
        t = tot[v]
        lines.append(f"| {v} | {t['calls']} | {t['numbers']:,} | {4 * t['numbers'] / 1e6:.2f} "
                     f"| {t['in_all_reduce_ms']:.1f} | {t['all_reduce_ms']:.1f} "
                     f"| {t['step_ms']:.1f} |")
    if 'ddp' in result:
        d = result['ddp']
        lines += ['', f"DDP's gradient all-reduce (every step, any norm): {d['numel']:,} numbers "
                      f"({4 * d['numel'] / 1e6:.1f} MB), bare all-reduce {d['all_reduce_ms']:.1f} "
                      "ms; SyncCBN's numbers per step are "
                      f"{100 * tot['SyncCBN']['numbers'] / d['numel']:.1f}% of it."]
    return '\n'.join(lines)


def worker(rank: int, world: int, args, init: str) -> None:
    dist.init_process_group(args.backend, init_method=init, rank=rank, world_size=world)
    try:
        result = run(rank, world, args)
        if result is not None:
            finish(result, args)
    finally:
        dist.destroy_process_group()


def finish(result: dict, args) -> None:
    print(report(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + '\n')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--nproc', type=int, default=2,
                   help='processes to spawn when not started by torchrun (default 2)')
    p.add_argument('--backend', default='gloo')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--threads', type=int, default=1, help='torch threads per process')
    p.add_argument('--image', type=int, nargs=2, default=[128, 192], metavar=('H', 'W'),
                   help='image size the FPN feature maps are derived from (default 128 192; '
                        'the paper trains at 800 1333)')
    p.add_argument('--images', type=int, default=2, help='images per process (default 2)')
    p.add_argument('--rois', type=int, default=16,
                   help='box-head RoIs per image (default 16; mmdet samples 512)')
    p.add_argument('--warmup', type=int, default=4)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--ddp-repeats', type=int, default=3)
    p.add_argument('--no-ddp-reference', dest='ddp_reference', action='store_false')
    p.add_argument('--out', help='also write the measurements as JSON here')
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:  # torchrun
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if args.device == 'cuda':
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        worker(rank, world, args, 'env://')
        return
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(args.nproc, args, f'tcp://127.0.0.1:{port}'),
                       nprocs=args.nproc, start_method='spawn')


if __name__ == '__main__':
    main()
