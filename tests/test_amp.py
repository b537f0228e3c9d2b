"""Mixed precision on the CPU: float16/bfloat16 autocast and GradScaler (issue 31, item 3).

* a conv + CBN stack trains a few hundred steps under autocast: finite, the statistics
  and the window float32;
* what a training forward saves for the backward is within 10% of BN's under the same
  autocast (the pooled norm keeps its half-precision input, as BN does);
* the ``dvar/dW`` weight-gradient convolution runs in the autocast dtype and
  ``<dvar/dW, W> = 2 var`` still holds to float32 rounding;
* a step ``GradScaler`` skips (inf/NaN gradients) leaves no trace in the window: the
  run equals one where that batch never came, with ``cbn_plugin.StepTracker`` and with
  ``CBNHook`` under an AMP optimizer wrapper (mmengine's ``AmpOptimWrapper`` refuses a
  CPU-only machine; ``CpuAmpOptimWrapper`` below does what it does, on the CPU);
* the two-pass statistics pass runs inside the wrapper's ``optim_context`` (autocast).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import cbn_plugin
import cbn_plugin.functional as CF
from cbn_plugin import CBN
from device_contracts import cpu_trains_in

DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}
# (float16 CPU autocast: not on torch 2.1, whose CPU autocast is bfloat16 only)
DTYPE_PARAMS = [pytest.param(name, marks=pytest.mark.skipif(
    not cpu_trains_in(dtype), reason=f'this torch has no {name} CPU autocast training'))
    for name, dtype in sorted(DTYPES.items())]
needs_cpu_scaler = pytest.mark.skipif(
    not hasattr(torch.amp, 'GradScaler') or not cpu_trains_in(torch.float16),
    reason='torch.amp.GradScaler and float16 CPU autocast are torch >= 2.3')


def stack(norm, layers: int = 3, width: int = 16, **cbn) -> nn.Sequential:
    """``layers`` x (conv 3x3, norm, ReLU) and a 1x1 conv head."""
    modules, cin = [], 3
    for _ in range(layers):
        modules += [nn.Conv2d(cin, width, 3, padding=1, bias=False), norm(width, **cbn),
                    nn.ReLU()]
        cin = width
    modules.append(nn.Conv2d(width, 1, 1))
    return nn.Sequential(*modules)


def batches(n: int, seed: int = 0, size: int = 12):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, size, size, generator=gen) + 0.3 for _ in range(n)]


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return (out.float() - 0.5).pow(2).mean()


# ---------------------------------------------------------------- training
@pytest.mark.parametrize('mode', ['default', 'paper'])
@pytest.mark.parametrize('dtype', DTYPE_PARAMS)
def test_a_conv_cbn_stack_trains_under_autocast(dtype, mode):
    torch.manual_seed(0)
    model = stack(CBN, window_size=4, mode=mode)
    cbn_plugin.bind(model, logger=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for x in batches(300):
        with torch.autocast('cpu', dtype=DTYPES[dtype]):
            out = model(x)
        assert out.dtype == DTYPES[dtype]
        loss = loss_of(out)
        loss.backward()
        opt.step()
        opt.zero_grad()
        cbn_plugin.step(model)
        losses.append(loss.detach())
    losses = torch.stack(losses)
    assert torch.isfinite(losses).all()
    assert losses[-50:].mean() < losses[:50].mean()  # it learns
    for _, layer in cbn_plugin.cbn_layers(model):
        assert layer.diagnostics['window'] == 4
        for name in ('window_mean', 'window_var', 'window_grad_mean', 'window_grad_var',
                     'running_mean', 'running_var'):
            t = getattr(layer, name)
            assert t.dtype == torch.float32 and torch.isfinite(t).all(), name
    assert all(torch.isfinite(p).all() for p in model.parameters())


def saved_bytes(model, x, dtype) -> int:
    """Bytes a training forward keeps for the backward (each storage once)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast('cpu', dtype=dtype):
        out = model(x)
    loss_of(out).backward()
    return sum(kept.values())


@pytest.mark.parametrize('dtype', DTYPE_PARAMS)
def test_saved_activations_within_ten_percent_of_bn(dtype):
    """The pooled norm saves its float16/bfloat16 input as BN does (a float32 copy made
    CBN save 1.47x BN's bytes over this stack, float16 and bfloat16 alike)."""
    xs = batches(6, size=24)
    found = {}
    for name, norm, cbn in (('BN', nn.BatchNorm2d, {}), ('CBN', CBN, dict(window_size=4)),
                            ('CBN paper', CBN, dict(window_size=4, mode='paper'))):
        torch.manual_seed(0)
        model = stack(norm, **cbn)
        if cbn:
            cbn_plugin.bind(model, logger=None)
        for x in xs[:5]:  # the window is full: the step pools it
            with torch.autocast('cpu', dtype=DTYPES[dtype]):
                loss_of(model(x)).backward()
            model.zero_grad()
            if cbn:
                cbn_plugin.step(model)
        found[name] = saved_bytes(model, xs[5], DTYPES[dtype])
    for name in ('CBN', 'CBN paper'):
        ratio = found[name] / found['BN']
        print(f'{dtype}: {name} saves {found[name]} bytes, BN {found["BN"]}: {ratio:.3f}x')
        assert ratio <= 1.10, (name, found)


@pytest.mark.parametrize('dtype', DTYPE_PARAMS)
def test_dvar_dw_in_half_precision_keeps_the_identity(dtype):
    """``<dvar/dW, W> = 2 var`` to float32 rounding (what makes the compensation vanish
    when the weight has not moved), and ``dvar/dW`` itself close to the float32 one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    x = torch.randn(4, 16, 20, 20) + 0.5
    with torch.no_grad(), torch.autocast('cpu', dtype=DTYPES[dtype]):
        out = conv(x)
    assert out.dtype == DTYPES[dtype]
    mean, var = CF.batch_stats(out)
    grad_mean, grad_var = CF.conv_stat_grads(x, out, mean, var, conv)
    assert grad_var.dtype == grad_mean.dtype == torch.float32
    weight = conv.weight.detach().flatten(1)
    identity = ((grad_var * weight).sum(1) - 2 * var).abs().max() / (2 * var).max()
    reference = CF.conv_stat_grads(x.to(out.dtype).float(), out.float(), mean, var, conv)[1]
    deviation = (grad_var - reference).norm() / reference.norm()
    print(f'{dtype} dvar/dW: identity error {identity:.2e}, vs float32 {deviation:.2e}')
    assert identity < 1e-5
    assert deviation < (2e-3 if dtype == 'float16' else 1e-2)


# ---------------------------------------------------------------- skipped steps
def _scaled_run(batch_list, skip_at=None, per_call_windows=False, halve_after=None,
                norm=CBN, accumulation='merge'):
    """fp16 autocast + GradScaler; the step at ``skip_at`` gets inf gradients (its
    forward is finite), so the scaler skips its optimizer step (and halves its scale:
    ``halve_after`` halves it after that step in a run without the skip, so that both
    runs round their float16 gradients alike). A batch of 4 images is a step of two
    micro-batches (gradient accumulation; a statistics pass first for ``'two_pass'``)."""
    torch.manual_seed(0)
    model = stack(norm, layers=2, window_size=3, per_call_windows=per_call_windows,
                  accumulation=accumulation)
    cbn_plugin.bind(model, logger=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8, growth_interval=10 ** 6)
    tracker = cbn_plugin.StepTracker(model, opt)
    stepped = []
    for i, x in enumerate(batch_list):
        micro = x.split(2)
        with torch.autocast('cpu', dtype=torch.float16):
            if accumulation == 'two_pass':
                with cbn_plugin.statistics_pass(model):
                    for part in micro:
                        model(part)
            for part in micro:
                loss = loss_of(model(part)) / len(micro)
                if i == skip_at:
                    loss = loss * float('inf')
                scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if i == halve_after:
            scaler.update(new_scale=scaler.get_scale() / 2)
        opt.zero_grad()
        stepped.append(tracker.end_step())
    return model, stepped


@needs_cpu_scaler
@pytest.mark.parametrize('accumulation', ['merge', 'two_pass'])
def test_a_skipped_accumulated_step_leaves_no_trace(accumulation):
    """Steps of two micro-batches: the skipped step's calls (and statistics pass) go."""
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 3, 12, 12, generator=gen) + 0.3 for _ in range(8)]
    skipped, stepped = _scaled_run(xs, skip_at=4, accumulation=accumulation)
    assert stepped == [i != 4 for i in range(8)]
    never, _ = _scaled_run(xs[:4] + xs[5:], halve_after=3, accumulation=accumulation)
    a, b = _windows(skipped), _windows(never)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m: f'{key}: {m}')


def _windows(model) -> dict:
    return {f'{n}.{k}': v.clone() for n, layer in cbn_plugin.cbn_layers(model)
            for k, v in layer.state_dict().items() if k.startswith(('window_', 'num_steps'))}


@needs_cpu_scaler
@pytest.mark.parametrize('per_call_windows', [False, True])
def test_a_skipped_step_leaves_no_trace_in_the_window(per_call_windows):
    xs = batches(9, seed=3)
    skipped, stepped = _scaled_run(xs, skip_at=5, per_call_windows=per_call_windows)
    assert stepped == [i != 5 for i in range(9)]
    never, _ = _scaled_run(xs[:5] + xs[6:], per_call_windows=per_call_windows, halve_after=4)
    a, b = _windows(skipped), _windows(never)
    assert a.keys() == b.keys()
    for key in a:  # one window position, the same records
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m: f'{key}: {m}')
    assert all(torch.equal(p, q) for p, q in zip(skipped.parameters(), never.parameters()))


def _sync_skip_worker(rank, store, results):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    try:
        xs = batches(9, seed=3 + rank)
        skipped, stepped = _scaled_run(xs, skip_at=5, norm=cbn_plugin.SyncCBN)
        never, _ = _scaled_run(xs[:5] + xs[6:], halve_after=4, norm=cbn_plugin.SyncCBN)
        shifts = [m.stats_shift.clone() for model in (skipped, never)
                  for _, m in cbn_plugin.cbn_layers(model)]
        torch.save(dict(stepped=stepped, a=_windows(skipped), b=_windows(never),
                        shifts=shifts), f'{results}.{rank}')
    finally:
        dist.destroy_process_group()


@needs_cpu_scaler
def test_a_skipped_step_leaves_no_trace_in_sync_cbn(tmp_path):
    """Two processes: the windows (the same on both) and the shift of the all-reduced
    sums equal those of the run where the batch never came."""
    import torch.multiprocessing as mp
    mp.start_processes(_sync_skip_worker, args=(str(tmp_path / 'store'),
                                                str(tmp_path / 'out')),
                       nprocs=2, start_method='spawn')
    for rank in range(2):
        found = torch.load(tmp_path / f'out.{rank}')
        assert found['stepped'] == [i != 5 for i in range(9)]
        for key in found['a']:
            torch.testing.assert_close(found['a'][key], found['b'][key], rtol=0, atol=0,
                                       msg=lambda m: f'{rank} {key}: {m}')
        half = len(found['shifts']) // 2
        for a, b in zip(found['shifts'][:half], found['shifts'][half:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- mmengine
def _cpu_amp_wrapper():
    """mmengine's AmpOptimWrapper, on the CPU: GradScaler('cpu') and float16 autocast."""
    from mmengine.optim import OptimWrapper
    from mmengine.registry import OPTIM_WRAPPERS

    if 'CpuAmpOptimWrapper' in OPTIM_WRAPPERS.module_dict:
        return

    @OPTIM_WRAPPERS.register_module()
    class CpuAmpOptimWrapper(OptimWrapper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8,
                                                    growth_interval=10 ** 6)

        def backward(self, loss, **kwargs):
            self.loss_scaler.scale(loss).backward(**kwargs)
            self._inner_count += 1

        def step(self, **kwargs):
            self.loss_scaler.unscale_(self.optimizer)
            self.loss_scaler.step(self.optimizer, **kwargs)
            self.loss_scaler.update()

        @contextlib.contextmanager
        def optim_context(self, model):
            with super().optim_context(model), torch.autocast('cpu', dtype=torch.float16):
                yield


class _Subset(torch.utils.data.Dataset):
    """``ToyData`` with sample ``bad``'s target infinite (its loss, not its forward), or
    without samples ``drop``."""

    def __init__(self, n, bad=(), drop=()):
        from helpers import ToyData
        self.data, self.bad = ToyData(n, shift=0.5), set(bad)
        self.index = [i for i in range(n) if i not in set(drop)]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        item = dict(self.data[self.index[i]])
        if self.index[i] in self.bad:
            item['y'] = torch.full_like(item['y'], float('inf'))
        return item


def _runner_run(tmp_path, dataset, loop=None, accumulate=1, accumulation='merge', iters=None):
    from helpers import ToyNet, tiny_runner
    _cpu_amp_wrapper()
    torch.manual_seed(0)
    model = ToyNet(window_size=3)
    model.bn.accumulation = accumulation
    runner = tiny_runner(tmp_path, model, dataset, shuffle=False, lr=0.05, momentum=0.9,
                         hooks=[dict(type='CBNHook', burn_in_iters=0)],
                         accumulate=accumulate, loop=loop, max_iters=iters,
                         max_epochs=1, default_hooks=dict(checkpoint=None),
                         log_level='WARNING', default_scope='mmengine')
    runner.optim_wrapper = dict(type='CpuAmpOptimWrapper', accumulative_counts=accumulate,
                                optimizer=dict(type='SGD', lr=0.05, momentum=0.9))
    runner.train()
    return model


@needs_cpu_scaler
def test_cbn_hook_forgets_a_step_the_amp_wrapper_skipped(tmp_path):
    """Batch 3 (samples 6, 7) has an infinite loss: the scaler skips its step, and the
    windows equal those of the run where it never came."""
    skipped = _runner_run(tmp_path / 'a', _Subset(16, bad=[7]))
    never = _runner_run(tmp_path / 'b', _Subset(16, drop=[6, 7]))
    assert skipped.bn.steps_done == never.bn.steps_done == 7
    a, b = _windows(skipped), _windows(never)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=lambda m: f'{key}: {m}')


@needs_cpu_scaler
def test_the_statistics_pass_runs_under_the_wrappers_autocast(tmp_path):
    """The two-pass loop's statistics pass sees what the training pass sees: the conv's
    float16 output under the AMP wrapper's autocast."""
    seen = []

    from helpers import ToyNet
    original = ToyNet.forward

    def forward(self, x, y, mode='tensor'):
        if not hasattr(self, '_dtype_hook'):
            self._dtype_hook = self.bn.register_forward_pre_hook(
                lambda m, args: seen.append((torch.is_grad_enabled(), args[0].dtype)))
        return original(self, x, y, mode)

    ToyNet.forward = forward
    try:
        _runner_run(tmp_path, _Subset(8), loop='TwoPassIterBasedTrainLoop', accumulate=2,
                    accumulation='two_pass', iters=4)
    finally:
        ToyNet.forward = original
    statistics = {dtype for grad, dtype in seen if not grad}
    training = {dtype for grad, dtype in seen if grad}
    assert statistics == training == {torch.float16}, seen


# ---------------------------------------------------------------- the digits detector
DETECTOR_STEPS = 20  # (about 2.5 s a step here on 2 shared cores: a few hundred would take 10 min)


@pytest.mark.parametrize('dtype', DTYPE_PARAMS)
def test_the_digits_detector_trains_under_autocast(dtype):
    """The study's Faster R-CNN (width 8, CBN in every norm) trains DETECTOR_STEPS steps
    on one batch with its backbone and FPN under autocast: finite, the windows float32,
    and a training forward saves within 10% of BN's bytes under the same autocast.
    (The features go on in float32: mmcv's CPU NMS and RoIAlign take no float16 or
    bfloat16, whatever the norm; the box head's CBN layers run in float32.)"""
    pytest.importorskip('mmdet')
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tools' / 'analysis_tools'))
    import host_overhead

    cpu = torch.device('cpu')
    saved = {}
    for norm in ('BN', 'CBN'):
        cfg = dict(type='BN', requires_grad=True) if norm == 'BN' else \
            dict(type='CBN', window_size=4)
        torch.manual_seed(0)
        model = host_overhead.digits_detector(cfg, cpu, width=8)
        cbn_plugin.bind(model, logger=None)
        extract = model.extract_feat

        def extract_feat(inputs, extract=extract):
            with torch.autocast('cpu', dtype=DTYPES[dtype]):
                return tuple(f.float() for f in extract(inputs))

        model.extract_feat = extract_feat
        model.train()
        data = model.data_preprocessor(host_overhead.digits_batch(cpu), True)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        losses = []
        steps = DETECTOR_STEPS if norm == 'CBN' else 5
        for i in range(steps):
            kept = {}

            def pack(t):
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = model.parse_losses(model(**data, mode='loss'))
            loss.backward()
            opt.step()
            opt.zero_grad()
            cbn_plugin.step(model)
            losses.append(loss.detach())
            if i == 4:  # past the window's filling (k = 4)
                saved[norm] = sum(kept.values())
        assert torch.isfinite(torch.stack(losses)).all(), (norm, losses)
    layers = cbn_plugin.cbn_layers(model)
    assert layers and all(layer.window_mean.dtype == torch.float32 for _, layer in layers)
    ratio = saved['CBN'] / saved['BN']
    print(f'digits detector {dtype}: CBN saves {ratio:.3f}x BN\'s bytes; loss '
          f'{losses[0].item():.3f} -> {losses[-1].item():.3f} in {DETECTOR_STEPS} steps')
    assert ratio <= 1.10
