"""Speed and memory of CBN against BN, GN and the authors' method, measured side by side.

Every figure is a ratio or a time measured in the same run: the variants are
interleaved repeat by repeat and the median is reported, so machine load
drifts hit all of them alike. Writes ``docs/benchmarks.md`` and
``docs/benchmarks.json``; a run of some parts keeps the other parts' figures
(each section names the command and run that produced it).

    .venv/bin/python tools/analysis_tools/benchmark.py                  # parts 1-3, CPU
    .venv/bin/python tools/analysis_tools/benchmark.py --parts layer    # one part
    .venv/bin/python tools/analysis_tools/benchmark.py --parts host deploy   # parts 4-5
    .venv/bin/python tools/analysis_tools/benchmark.py --device cuda    # on a GPU
    .venv/bin/python tools/analysis_tools/benchmark.py --from-json      # re-render, no run

Parts:
1. layer: conv + norm, forward and backward, at FPN and box-head shapes.
2. detector: one training step (forward, backward, SGD step) of Faster R-CNN
   R50-FPN with the 4conv1fc head, norms in the authors' placement.
3. inference: eval-mode CBN model vs BN model, and after conversion to BN.
4. host: the host overhead per layer per training step (aten ops dispatched,
   host time, kernels on a GPU, torch.compile, SyncCBN, the digits and R50-FPN
   detectors, peak memory) and the targets for the defaults
   (``host_overhead.py``). ``--record NAME`` names the run; the record
   ``'before the lean layer'`` is kept and later records are shown beside it.
5. deploy: inference of the digits and R50-FPN detectors with BN folded into
   the conv, CBN converted to BN and folded, and GN (``deploy_inference.py``).

The authors' method is re-implemented here (``AuthorsCBN``) with their costs:
two ``torch.autograd.grad`` calls with ``retain_graph`` per layer per step,
and Python lists of mu, nu, dmu/dW, dnu/dW and W.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cbn_plugin  # noqa: E402
import deploy_inference  # noqa: E402
import host_overhead  # noqa: E402
from cbn_plugin import CBN  # noqa: E402


# ---------------------------------------------------------------- reference
class AuthorsCBN(nn.Module):
    """The authors' CBN, for comparison (github.com/Howal/Cross-iterationBatchNorm).

    Needs the conv weight (their forward took it as a second argument; here
    ``conv`` is set after construction). Compensates the last ``window_size - 1``
    steps with derivatives from two autograd.grad calls, drops entries with
    nu < mu^2, and keeps everything in Python lists.
    """

    def __init__(self, num_features, window_size=4, eps=1e-5, momentum=0.1, **_):
        super().__init__()
        self.num_features, self.window_size = num_features, window_size
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.pre_mu, self.pre_nu, self.pre_dmu, self.pre_dnu, self.pre_w = [], [], [], [], []
        self.conv = None

    def forward(self, x):
        c = self.num_features
        if not self.training:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var,
                                            self.weight, self.bias, False, 0.0, self.eps)
        weight = self.conv.weight
        flat = x.transpose(0, 1).reshape(c, -1)
        mu, nu = flat.mean(1), (flat * flat).mean(1)
        ones = torch.ones_like(mu)
        dmu = torch.autograd.grad(mu, weight, ones, retain_graph=True)[0]
        dnu = torch.autograd.grad(nu, weight, ones, retain_graph=True)[0]
        mus, nus = [mu], [nu]
        for pm, pn, pdm, pdn, pw in zip(self.pre_mu, self.pre_nu, self.pre_dmu, self.pre_dnu,
                                        self.pre_w):
            dw = weight.detach() - pw
            mus.append(pm + (pdm * dw).sum((1, 2, 3)))
            nus.append(pn + (pdn * dw).sum((1, 2, 3)))
        mu_all, nu_all = torch.stack(mus), torch.stack(nus)
        keep = (nu_all - mu_all * mu_all >= 0).to(x.dtype)
        keep[0] = 1
        count = keep.sum(0)
        mean = (mu_all * keep).sum(0) / count
        var = (nu_all * keep).sum(0) / count - mean * mean
        k1 = self.window_size - 1
        self.pre_mu = [mu.detach()] + self.pre_mu[:k1 - 1]
        self.pre_nu = [nu.detach()] + self.pre_nu[:k1 - 1]
        self.pre_dmu = [dmu.detach()] + self.pre_dmu[:k1 - 1]
        self.pre_dnu = [dnu.detach()] + self.pre_dnu[:k1 - 1]
        self.pre_w = [weight.detach().clone()] + self.pre_w[:k1 - 1]
        with torch.no_grad():
            m = flat.shape[1]
            self.running_mean.lerp_(mu.detach(), self.momentum)
            self.running_var.lerp_((nu - mu * mu).detach() * m / (m - 1), self.momentum)
        shape = (1, -1, 1, 1)
        return ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
                * self.weight.view(shape) + self.bias.view(shape))

    def window_numel(self):
        return sum(t.numel() for lst in (self.pre_mu, self.pre_nu, self.pre_dmu, self.pre_dnu,
                                         self.pre_w) for t in lst)


def attach_authors(model):
    """Give every AuthorsCBN the conv of its ConvModule (or the conv before it)."""
    for module in model.modules():
        norm = getattr(module, 'norm', None) if hasattr(module, 'norm_name') else None
        if isinstance(norm, AuthorsCBN):
            norm.conv = module.conv
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for before, after in zip(module, list(module)[1:]):
                if isinstance(after, AuthorsCBN):
                    after.conv = before


# ---------------------------------------------------------------- timing
def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device, fastest: dict | None = None) -> dict:
    """Median seconds per call of each function, calls interleaved repeat by repeat.

    ``fastest`` (optional) receives each function's fastest call: other jobs
    on a shared machine only ever slow a call down, so the minimum is the
    figure least touched by them.
    """
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    if fastest is not None:
        fastest.update({name: min(t) for name, t in times.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def sampled_label(stride):
    return f'CBN default sampled s={stride}'


def norm_configs(window=4, strides=(2, 4)) -> dict:
    """Every variant compared, by name: its ``norm_cfg`` (``None``: no norm).

    The detector takes them as they are; the layer part builds them with
    ``build_norm`` and has no ``'none'`` row.
    """
    cfgs = {'none': None, 'BN': dict(type='BN'), 'GN': dict(type='GN', num_groups=32),
            'CBN burn-in': dict(type='CBN', window_size=window),
            # The paper's algorithm: what the authors' layer computes, like for like.
            'CBN paper': dict(type='CBN', window_size=window, mode='paper'),
            # The defaults: the compensated backward (var form) and window statistics.
            'CBN default': dict(type='CBN', window_size=window),
            'CBN default, mu_nu': dict(type='CBN', window_size=window, compensation='mu_nu')}
    for s in strides:
        cfgs[sampled_label(s)] = dict(type='CBN', window_size=window, dvar_stride=s)
    # The floor of any compensated CBN: the window without derivatives.
    cfgs['naive CBN'] = dict(type='CBN', window_size=window, rho=0.0)
    cfgs['authors CBN'] = dict(type='AuthorsCBN', window_size=window)
    return cfgs


def build_norm(cfg: dict, channels: int) -> nn.Module:
    """The layer of a ``norm_configs`` entry, without mmcv's registry."""
    kwargs = dict(cfg)
    kind = kwargs.pop('type')
    if kind == 'GN':
        return nn.GroupNorm(kwargs['num_groups'], channels)
    return {'BN': nn.BatchNorm2d, 'CBN': CBN, 'AuthorsCBN': AuthorsCBN}[kind](channels, **kwargs)


def prepare(model, name):
    """Bind CBN and AuthorsCBN layers to their convs; the burn-in variant stays BN."""
    cbn_plugin.bind(model, logger=None)
    attach_authors(model)
    if name == 'CBN burn-in':
        for _, layer in cbn_plugin.cbn_layers(model):
            layer.set_schedule(burn_in_steps=10 ** 9)  # plain BN for the whole benchmark
    return model


def window_numel(model):
    total = 0
    for m in model.modules():
        if isinstance(m, (CBN, AuthorsCBN)):
            total += m.window_numel()
    return total


# ---------------------------------------------------------------- part 1
LAYER_SHAPES = [
    # name, batch, cin, cout, kernel, size
    ('FPN 3x3 256->256 @64x64', 2, 256, 256, 3, 64),
    ('FPN 3x3 256->256 @32x32', 2, 256, 256, 3, 32),
    ('FPN 3x3 256->256 @16x16', 4, 256, 256, 3, 16),
    ('FPN lateral 1x1 512->256 @64x64', 2, 512, 256, 1, 64),
    ('box head 3x3 256->256, RoIs @7x7', None, 256, 256, 3, 7),
]


def layer_steps(batch: int, cin: int, cout: int, kernel: int, size, cfgs: dict, device,
                fill: int) -> tuple[dict, dict]:
    """A conv + norm layer step per variant of ``cfgs`` (name -> ``norm_configs`` entry;
    ``None`` skipped) on a ``batch`` x ``cin`` x ``size`` input (an int: square; or
    ``(h, w)``): forward, backward, ``cbn_plugin.step``, called ``fill`` times first (the
    windows filled). Returns ``(steps, models)`` by name."""
    h, w = (size, size) if isinstance(size, int) else size
    # The input needs its gradient, as inside a network: otherwise the conv's
    # backward is its weight gradient alone and CBN's one extra looks twice as dear.
    x = torch.randn(batch, cin, h, w, device=device, requires_grad=True)
    grad = torch.randn(batch, cout, h, w, device=device)
    fns, models = {}, {}
    for norm, cfg in cfgs.items():
        if cfg is None:
            continue
        torch.manual_seed(0)
        model = prepare(nn.Sequential(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            build_norm(cfg, cout)).to(device), norm)

        def call(model=model):
            model(x).backward(grad)
            x.grad = None
            cbn_plugin.step(model)
        for _ in range(fill):
            call()
        fns[norm], models[norm] = call, model
    return fns, models


def layer_part(args, device):
    rows = []
    for name, batch, cin, cout, kernel, size in LAYER_SHAPES:
        batch = batch or args.rois
        label = name.replace('RoIs', f'{batch} RoIs')
        fns, models = layer_steps(batch, cin, cout, kernel, size,
                                  norm_configs(args.window, args.dvar_strides), device,
                                  args.window + 1)
        times = interleaved(fns, args.repeats, device)
        for norm, seconds in times.items():
            rows.append(dict(shape=label, norm=norm, ms=seconds * 1e3,
                             ratio_to_bn=seconds / times['BN'],
                             window_numbers=window_numel(models[norm])))
        print(f'  {label}: ' + ', '.join(f'{n} {times[n] / times["BN"]:.2f}x' for n in times),
              flush=True)
    return rows


def composite_pooled_norm(x, past_mean, past_var, weight, bias, eps):
    """The pooled normalisation written with autograd ops (the alternative to our Function)."""
    var_cur, mean_cur = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    count = past_mean.shape[0] + 1
    mean = (mean_cur + past_mean.sum(0)) / count
    var = (var_cur + (mean_cur - mean) ** 2 + (past_var + (past_mean - mean) ** 2).sum(0)) / count
    scale = torch.rsqrt(var + eps) * weight
    return x * scale.view(1, -1, 1, 1) + (bias - mean * scale).view(1, -1, 1, 1)


def normalisation_part(args, device):
    """Normalisation alone (no conv): BN's fused training kernels, our autograd
    Function on BN's fused inference kernels, and the same maths in autograd ops."""
    from cbn_plugin import functional as CF
    rows = []
    for batch, size in ((2, 64), (args.rois, 7)):
        x = torch.randn(batch, 256, size, size, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        weight = torch.rand(256, device=device, requires_grad=True)
        bias = torch.rand(256, device=device, requires_grad=True)
        past_mean = torch.randn(args.window - 1, 256, device=device)
        past_var = torch.rand(args.window - 1, 256, device=device) + 0.5

        def bn():
            y = nn.functional.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)
            y.backward(grad)

        def function():
            with torch.no_grad():
                mean_cur, var_cur = CF.batch_stats(x)
                valid = torch.ones_like(past_mean, dtype=torch.bool)
                mean, var, pooled = CF.pool_window(mean_cur, var_cur, past_mean, past_var, valid)
            y = CF.pooled_batch_norm(x, mean, var, 1.0 / pooled, weight, bias, 1e-5)
            y.backward(grad)

        def composite():
            composite_pooled_norm(x, past_mean, past_var, weight, bias, 1e-5).backward(grad)
        times = interleaved({'BN (fused, training)': bn, 'CBN Function (ours)': function,
                             'CBN in autograd ops': composite}, args.repeats, device)
        label = f'{batch}x256x{size}x{size}'
        for name, seconds in times.items():
            rows.append(dict(shape=label, variant=name, ms=seconds * 1e3,
                             ratio_to_bn=seconds / times['BN (fused, training)']))
        print(f'  norm only {label}: ' + ', '.join(
            f'{n} {t / times["BN (fused, training)"]:.2f}x' for n, t in times.items()), flush=True)
    return rows


# ---------------------------------------------------------------- part 2
def detector_cfg(norm_cfg, args):
    from mmengine.hub import get_config
    cfg = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py').model
    cfg.backbone.init_cfg = None
    cfg.neck.norm_cfg = norm_cfg
    cfg.roi_head.bbox_head = dict(
        type='Shared4Conv1FCBBoxHead', in_channels=256, fc_out_channels=1024,
        roi_feat_size=7, num_classes=80, norm_cfg=norm_cfg,
        bbox_coder=cfg.roi_head.bbox_head.bbox_coder, reg_class_agnostic=False,
        loss_cls=cfg.roi_head.bbox_head.loss_cls, loss_bbox=cfg.roi_head.bbox_head.loss_bbox)
    cfg.train_cfg.rcnn.sampler.num = args.rois_per_image
    return cfg


def detector_step(name, args, device):
    """A built detector for variant ``name`` and its training-step function."""
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules()
    if 'AuthorsCBN' not in MODELS.module_dict:
        MODELS.register_module('AuthorsCBN', module=AuthorsCBN)
    torch.manual_seed(0)
    batch = demo_mm_inputs(2, (3, args.image, args.image), num_items=[8, 8], num_classes=80,
                           device=str(device))
    torch.manual_seed(0)
    norm_cfg = norm_configs(args.window, args.dvar_strides)[name]
    model = MODELS.build(detector_cfg(norm_cfg, args)).to(device)
    attach_authors(model)
    opt, step = host_overhead.detector_training_step(model, batch,
                                                     burn_in=name == 'CBN burn-in')
    step.optimizer = opt  # the host part counts its state in the memory that persists
    return model, step


def detector_part(args, device):
    fns, models = {}, {}
    for name in norm_configs(args.window, args.dvar_strides):
        models[name], fns[name] = detector_step(name, args, device)
        for _ in range(args.window):
            fns[name]()
        print(f'  built {name}', flush=True)
    fastest = {}
    times = interleaved(fns, args.detector_repeats, device, fastest)
    peaks = {name: peak_memory(name, fns[name], args, device) for name in times}
    rows = [dict(norm=name, s=seconds, ratio_to_bn=seconds / times['BN'],
                 ratio_to_bn_fastest=fastest[name] / fastest['BN'],
                 window_numbers=window_numel(models[name]), peak_mib=peaks[name])
            for name, seconds in times.items()]
    print('  ' + ', '.join(f'{n} {times[n] / times["BN"]:.3f}x '
                           f'({fastest[n] / fastest["BN"]:.3f}x fastest)' for n in times),
          flush=True)
    profile = profile_step(fns['CBN paper'], device) if args.profile else None
    summary = dict(authors_window_formula=authors_numbers(models['CBN paper'], args.window))
    for suffix, t in (('', times), ('_fastest', fastest)):
        authors_overhead = t['authors CBN'] / t['BN'] - 1
        ours_overhead = t['CBN paper'] / t['BN'] - 1
        summary['default_vs_paper' + suffix] = t['CBN default'] / t['CBN paper']
        summary.update({
            'overhead_ours' + suffix: ours_overhead, 'overhead_authors' + suffix: authors_overhead,
            'overhead_share' + suffix: (ours_overhead / authors_overhead
                                        if authors_overhead > 0 else None)})
    return rows, summary, profile


def peak_memory(name, step, args, device):
    """Peak memory of training variant ``name``, MiB.

    CUDA: the allocator's peak over one step. CPU has no allocator statistics:
    a fresh process builds the detector alone and trains it ``window + 1``
    steps; the figure is its peak resident set (``VmHWM``) minus its resident
    set once built, i.e. what training adds (activations, gradients,
    optimizer state, window) over the model itself. The child fixes glibc's
    mmap threshold at 64 KiB, so a freed tensor leaves the resident set at
    once: with the default, adaptive threshold the allocator's caching moved
    the figure by more than the window itself.
    """
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    if not args.peak_memory:
        return None
    import subprocess
    child = [sys.executable, __file__, '--peak-rss-of', name, '--window', str(args.window),
             '--image', str(args.image), '--rois-per-image', str(args.rois_per_image),
             '--threads', str(args.threads), '--dvar-strides', *map(str, args.dvar_strides)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    out = subprocess.run(child, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])['training_peak_mib']


def _proc_status_mib(field):
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f'no {field} in /proc/self/status')


def peak_rss_child(args):
    """The child of ``peak_memory``: prints one JSON line."""
    _, step = detector_step(args.peak_rss_of, args, torch.device('cpu'))
    try:  # "5" resets the high-water mark to the current resident set (Linux >= 4.0)
        Path('/proc/self/clear_refs').write_text('5')
    except OSError:
        pass
    built = _proc_status_mib('VmRSS')
    for _ in range(args.window + 1):
        step()
    peak = _proc_status_mib('VmHWM')
    print(json.dumps(dict(variant=args.peak_rss_of, built_mib=built, peak_mib=peak,
                          training_peak_mib=peak - built)))


def authors_numbers(model, window):
    """The authors' 3*(k-1)*|W| (+ 2*(k-1)*C) per CBN layer, for the same model."""
    total = 0
    for _, layer in cbn_plugin.cbn_layers(model):
        conv = layer.bound_conv
        total += (window - 1) * (3 * conv.weight.numel() + 2 * layer.num_features)
    return total


def profile_step(step, device):
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        step()
    key = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=15)


# ---------------------------------------------------------------- part 3
def inference_part(args, device):
    rows = []
    x = torch.randn(2, 256, 64, 64, device=device)

    def stack(norm):
        layers = []
        for _ in range(4):
            layers += [nn.Conv2d(256, 256, 3, padding=1, bias=False), norm(256), nn.ReLU()]
        return nn.Sequential(*layers).to(device)
    torch.manual_seed(0)
    bn = stack(nn.BatchNorm2d)
    cbn = stack(lambda c: CBN(c, window_size=args.window))
    cbn.load_state_dict(bn.state_dict())
    cbn_plugin.bind(cbn, logger=None)
    converted = cbn_plugin.convert_to_bn(copy.deepcopy(cbn))
    for model in (bn, cbn, converted):
        model.eval()
    with torch.no_grad():
        same = torch.equal(cbn(x), converted(x))
        fns = {name: (lambda m=m: m(x)) for name, m in
               (('BN', bn), ('CBN eval', cbn), ('CBN converted to BN', converted))}
        times = interleaved(fns, args.repeats, device)
    for name, seconds in times.items():
        rows.append(dict(model=name, ms=seconds * 1e3, ratio_to_bn=seconds / times['BN']))
    print('  ' + ', '.join(f'{n} {times[n] / times["BN"]:.3f}x' for n in times), flush=True)
    return rows, same


# ---------------------------------------------------------------- report
def machine(device):
    info = dict(python=platform.python_version(), torch=torch.__version__,
                platform=platform.platform(), cpus=os.cpu_count(),
                threads=torch.get_num_threads(), device=str(device))
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name()
    try:
        info['load_average'] = os.getloadavg()
    except OSError:
        pass
    return info


# Which keys of the results each part writes (a run of some parts keeps the others').
PART_KEYS = {
    'layer': ('layer', 'normalisation'),
    'detector': ('detector', 'detector_summary', 'profile', 'detector_setting'),
    'inference': ('inference', 'inference_identical'),
    'host': ('host',),
    'deploy': ('deploy',),
}


def load_previous(path: Path) -> dict:
    """The figures already on the page (its json), each part with the run that made it."""
    json_path = path.with_suffix('.json')
    if not json_path.exists():
        return {}
    old = json.loads(json_path.read_text())
    if 'runs' not in old and 'command' in old:  # one run made the whole page
        run = {k: old.pop(k) for k in ('command', 'date', 'machine')}
        old['runs'] = {part: run for part in ('layer', 'detector', 'inference')
                       if PART_KEYS[part][0] in old}
    return old


def merge(previous: dict, new: dict, parts) -> dict:
    """``previous`` with the parts run now replaced (host records: by name)."""
    merged = dict(previous)
    merged['runs'] = dict(previous.get('runs', {}))
    for part in parts:
        for key in PART_KEYS[part]:
            if part == 'host':
                merged['host'] = {**previous.get('host', {}), **new['host']}
            elif key in new:
                merged[key] = new[key]
            else:
                merged.pop(key, None)
        merged['runs'][part] = new['run']
    return merged


def run_line(run: dict) -> str:
    m = run['machine']
    load = m.get('load_average'), m.get('load_average_end')
    loads = ' -> '.join(f'{a[0]:.1f}' for a in load if a)
    return (f'Run: `{run["command"]}` on {run["date"]}; {m["device"]}'
            + (f' ({m["gpu"]})' if m.get('gpu') else '')
            + f', torch {m["torch"]}, {m["cpus"]} CPUs, {m["threads"]} torch thread(s)'
            + (f', load average {loads}' if loads else '') + '.')


def write_report(results, path: Path):
    runs = results.get('runs', {})
    lines = ['# Benchmarks', '',
             'Each section names the command that produced it: rerun it to regenerate the '
             f'section (the other sections are kept, from `{path.with_suffix(".json").name}`). '
             'Ratios are measured side by side within one run (interleaved repeats).']
    devices = {r['machine']['device'] for r in runs.values()}
    if devices <= {'cpu'}:
        lines += ['', 'CPU only: no GPU on the machine that produced this page.']
    if 'layer' in results:
        lines += ['', '## 1. Layer: conv + norm, forward and backward', '',
                  run_line(runs['layer']), '',
                  '| shape | norm | ms/call | vs BN | window numbers |', '|---|---|---|---|---|']
        lines += [f'| {r["shape"]} | {r["norm"]} | {r["ms"]:.1f} | {r["ratio_to_bn"]:.2f} | '
                  f'{r["window_numbers"]:,} |' for r in results['layer']]
    if 'normalisation' in results:
        lines += ['', '### Normalisation alone, forward and backward (the measured choice)', '',
                  '| shape | variant | ms/call | vs BN |', '|---|---|---|---|']
        lines += [f'| {r["shape"]} | {r["variant"]} | {r["ms"]:.2f} | {r["ratio_to_bn"]:.2f} |'
                  for r in results['normalisation']]
    if 'detector' in results:
        d = results['detector_summary']
        peak_header = ('peak MiB (CUDA allocator, one step)'
                       if runs['detector']['machine']['device'] != 'cpu'
                       else 'peak MiB (CPU: resident memory training adds to the built model)')
        lines += ['', '## 2. Detector: one training step of Faster R-CNN R50-FPN 4conv1fc', '',
                  run_line(runs['detector']), '', results['detector_setting'], '',
                  '| norm in FPN + box head | s/step (median) | vs BN (median) | '
                  f'vs BN (fastest steps) | window numbers | {peak_header} |',
                  '|---|---|---|---|---|---|']
        lines += [f'| {r["norm"]} | {r["s"]:.2f} | {r["ratio_to_bn"]:.3f} | '
                  f'{r["ratio_to_bn_fastest"]:.3f} | {r["window_numbers"]:,} | '
                  + (f'{r["peak_mib"]:,.0f} |' if r['peak_mib'] is not None else 'not measured |')
                  for r in results['detector']]
        lines.append('')
        for suffix, label in (('', 'medians'), ('_fastest', 'fastest steps')):
            share = d['overhead_share' + suffix]
            lines.append(f'- Overhead over BN ({label}): ours {d["overhead_ours" + suffix]:+.1%}, '
                         f'the authors\' {d["overhead_authors" + suffix]:+.1%}; ours is '
                         + (f'{share:.0%} of theirs.' if share is not None else 'not comparable.'))
            lines.append(f'- The defaults (compensated backward) against the paper\'s backward '
                         f'({label}): {d["default_vs_paper" + suffix]:.3f}x.')
        lines += [
                  f'- Whole-detector window memory: ours '
                  f'{next(r for r in results["detector"] if r["norm"] == "CBN paper")["window_numbers"]:,}'
                  f' numbers; the authors\' formula 3(k-1)|W| + 2(k-1)C gives '
                  f'{d["authors_window_formula"]:,}.']
        if results.get('profile'):
            lines += ['', '### Profile of the CBN paper step (torch.profiler, top ops)', '',
                      '```', results['profile'].rstrip(), '```']
    if 'inference' in results:
        lines += ['', '## 3. Inference: 4 x (conv 3x3 256 + norm + ReLU), 2x256x64x64', '',
                  run_line(runs['inference']), '',
                  '| model | ms | vs BN |', '|---|---|---|']
        lines += [f'| {r["model"]} | {r["ms"]:.1f} | {r["ratio_to_bn"]:.3f} |'
                  for r in results['inference']]
        lines += ['', f'- Converted model output identical to CBN eval output: '
                  f'{results["inference_identical"]}']
    if results.get('host'):
        lines += ['', '## 4. Host overhead per layer per training step', '',
                  host_overhead.__doc__.split('\n\n')[1].replace('\n', ' ').replace('``', '`'),
                  '',
                  'Each record below is one run of the command it names; a later record is '
                  f'shown beside the record {host_overhead.BASELINE_RECORD!r}. Op counts are '
                  'exact; times are comparable only within a record (ratios), not across '
                  'records or machines.']
        records = results['host']
        baseline = records.get(host_overhead.BASELINE_RECORD)
        order = [n for n in records if n != host_overhead.BASELINE_RECORD] \
            + ([host_overhead.BASELINE_RECORD] if baseline else [])
        for name in order:
            lines += [''] + host_overhead.render(name, records[name], baseline,
                                                 run_line(records[name]['run']))
    if results.get('deploy'):
        lines += ['', '## 5. Deployment: inference with the norm folded into the conv', '',
                  run_line(runs['deploy']), '', deploy_inference.__doc__.split('\n\n')[1]
                  .replace('\n', ' ').replace('``', '`'), '',
                  'Folded here by `fold_conv_norms` in `tools/analysis_tools/deploy_inference.py`'
                  ' (over `torch.nn.utils.fusion.fuse_conv_bn_eval`): the plugin ships no fold '
                  'helper. Weights are random but shared: the CBN model carries the BN model\'s '
                  'state, so the two run the same network.']
        lines += deploy_inference.render(results['deploy'])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(lines) + '\n')
    path.with_suffix('.json').write_text(json.dumps(results, indent=1, default=str) + '\n')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--parts', nargs='+', default=['layer', 'detector', 'inference'],
                        choices=list(PART_KEYS))
    parser.add_argument('--window', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--detector-repeats', type=int, default=3)
    parser.add_argument('--rois', type=int, default=256, help='RoIs in the box-head layer shape')
    parser.add_argument('--image', type=int, default=320, help='detector input size (square)')
    parser.add_argument('--rois-per-image', type=int, default=512,
                        help='sampled RoIs per image in the detector (mmdet default 512)')
    parser.add_argument('--dvar-strides', type=int, nargs='+', default=[2, 4],
                        help='dvar_stride of the sampled CBN variants')
    parser.add_argument('--no-profile', dest='profile', action='store_false')
    parser.add_argument('--no-peak-memory', dest='peak_memory', action='store_false',
                        help='CPU: skip the per-variant child processes that measure peak RSS')
    parser.add_argument('--peak-rss-of', help=argparse.SUPPRESS)  # internal: peak_memory's child
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (1: ratios robust to other load on the machine)')
    parser.add_argument('--out', default=str(ROOT / 'docs' / 'benchmarks.md'))
    parser.add_argument('--from-json', action='store_true',
                        help='measure nothing: re-render the page from its json')
    parser.add_argument('--fresh', action='store_true',
                        help='write only the parts run now (default: keep the page\'s other parts)')
    host = parser.add_argument_group('part 4, host overhead (host_overhead.py)')
    host.add_argument('--record', default='latest',
                      help=f'name of this host record (the record '
                      f'{host_overhead.BASELINE_RECORD!r} is the one others are shown beside)')
    host.add_argument('--host-layers', type=int, nargs=2, default=[4, 12],
                      metavar=('SHALLOW', 'DEEP'), help='stack depths whose difference is measured')
    host.add_argument('--host-repeats', type=int, default=7, help='interleaved repeats (fastest kept)')
    host.add_argument('--host-steps', type=int, default=20, help='training steps per timed repeat')
    host.add_argument('--top-ops', type=int, default=15)
    host.add_argument('--compile-steps', type=int, default=12,
                      help='training steps of each compiled stack (more than the recompile limit 8)')
    host.add_argument('--compile-backend', default='inductor',
                      help='torch.compile backend (inductor; aot_eager or eager compile faster)')
    host.add_argument('--sync-timeout', type=float, default=900,
                      help='seconds to wait for the 2 SyncCBN processes')
    host.add_argument('--digits-repeats', type=int, default=7)
    host.add_argument('--r50-repeats', type=int, default=3)
    host.add_argument('--digits-width', type=int, default=None,
                      help='width of the digits detector (default: the study\'s 32)')
    for flag, what in (('compile', 'torch.compile rows'), ('sync', 'SyncCBN processes'),
                       ('digits', 'digits detector'), ('r50', 'R50-FPN detector')):
        host.add_argument(f'--no-host-{flag}', dest=f'host_{flag}', action='store_false',
                          help=f'skip the {what}')
    deploy = parser.add_argument_group('part 5, deployment (deploy_inference.py)')
    deploy.add_argument('--deploy-repeats', type=int, default=7)
    deploy.add_argument('--r50-deploy-repeats', type=int, default=3)
    deploy.add_argument('--no-deploy-r50', dest='deploy_r50', action='store_false')
    args = parser.parse_args(argv)
    for name in ('repeats', 'detector_repeats', 'host_repeats', 'host_steps', 'compile_steps',
                 'digits_repeats', 'r50_repeats', 'deploy_repeats', 'r50_deploy_repeats', 'window'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    shallow, deep = args.host_layers
    if not 1 <= shallow < deep:
        parser.error(f'--host-layers needs 1 <= SHALLOW < DEEP, got {shallow} {deep}')
    torch.set_num_threads(args.threads)
    if args.from_json:
        out = Path(args.out)
        write_report(load_previous(out), out)
        return print(f'wrote {args.out}')
    if args.peak_rss_of:
        return peak_rss_child(args)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch sees no CUDA device on this machine')
    command = 'python tools/analysis_tools/benchmark.py ' + ' '.join(
        repr(a) if ' ' in a else a for a in (sys.argv[1:] if argv is None else argv))
    results = dict(run=dict(command=command, date=time.strftime('%Y-%m-%d %H:%M'),
                            machine=machine(device)))
    if 'layer' in args.parts:
        print('layer part', flush=True)
        results['layer'] = layer_part(args, device)
        results['normalisation'] = normalisation_part(args, device)
    if 'detector' in args.parts:
        print('detector part', flush=True)
        rows, summary, profile = detector_part(args, device)
        results.update(detector=rows, detector_summary=summary, profile=profile,
                       detector_setting=f'2 images of {args.image}x{args.image}, '
                       f'{args.rois_per_image} sampled RoIs per image, window {args.window}, '
                       'SGD step included, ResNet-50 backbone with BN (trainable).')
    if 'inference' in args.parts:
        print('inference part', flush=True)
        results['inference'], results['inference_identical'] = inference_part(args, device)
    if 'host' in args.parts:
        print('host part', flush=True)
        record = host_overhead.run(args, device, detector_step)
        record['run'] = results['run']
        results['host'] = {args.record: record}
        for target, met, measured in host_overhead.targets(
                record, results['host'].get(host_overhead.BASELINE_RECORD)
                or load_previous(Path(args.out)).get('host', {}).get(
                    host_overhead.BASELINE_RECORD)):
            print(f'  {"not measured" if met is None else "PASS" if met else "FAIL"}: '
                  f'{target}: {measured}', flush=True)
    if 'deploy' in args.parts:
        print('deploy part', flush=True)
        results['deploy'] = deploy_inference.run(args, device, detector_cfg)
    results['run']['machine']['load_average_end'] = os.getloadavg()
    out = Path(args.out)
    write_report(merge({} if args.fresh else load_previous(out), results, args.parts), out)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
