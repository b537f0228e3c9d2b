"""CUDA correctness by construction, on this CPU machine (issue 31, section 1).

* every aten call of a training step, in every mode and under float16/bfloat16
  autocast, meets what its CUDA kernel requires (``device_contracts.KernelContracts``);
* a training step whose tensors all live on another device (``meta``) makes no tensor
  on the host, copies nothing to the device and mixes no devices, also after the
  model moved there with a filled window (``device_contracts.DeviceChecker``);
* ``model.half()`` after the window exists keeps the window's statistics float32.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import CBN, SyncCBN, compat
from device_contracts import (DeviceChecker, KernelContracts, contract_violations,
                              cpu_trains_in)
from helpers import on_two_ranks


class Net(nn.Module):
    def __init__(self, norm=CBN, **cbn):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = norm(8, **cbn)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = norm(8, **cbn)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


# name: (layer arguments, burn-in steps, ramp steps)
MODES = {
    'default': (dict(window_size=3), 0, 0),
    'paper': (dict(window_size=3, mode='paper'), 0, 0),
    'naive': (dict(window_size=3, rho=0.0), 0, 0),
    'pooled': (dict(window_size=3, stats_backward='pooled', variance_rule='exclude'), 0, 0),
    'mu_nu-sampled': (dict(window_size=3, compensation='mu_nu', dvar_stride=2), 0, 0),
    'two-pass': (dict(window_size=3, accumulation='two_pass'), 0, 0),
    'per-call': (dict(window_size=3, per_call_windows=True), 0, 0),
    'burn-in': (dict(window_size=3), 3, 0),
    'ramp': (dict(window_size=4), 2, 3),
    'no-affine': (dict(window_size=3, affine=False), 0, 0),
    'sync-without-group': (dict(window_size=3, norm=SyncCBN), 0, 0),
}
AUTOCAST = {'float32': None, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def build(mode: str, device=None) -> tuple[Net, torch.optim.Optimizer]:
    args, burn_in, ramp = MODES[mode]
    args = dict(args)
    torch.manual_seed(0)
    model = Net(args.pop('norm', CBN), **args)
    cbn_plugin.bind(model, logger=None)
    for layer in (model.bn1, model.bn2):
        layer.set_schedule(burn_in, ramp)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train(model, opt, steps: int, device='cpu', dtype=None, calls: int = 2,
          empty_step: bool = True, empty_at: int | None = None) -> None:
    """``steps`` optimizer steps of ``calls`` micro-batches (two-pass layers: a statistics
    pass first; step ``empty_at`` on empty batches), then a step on an empty batch and an
    eval forward."""
    two_pass = model.bn1.accumulation == 'two_pass'
    gen = torch.Generator().manual_seed(1)

    def batch(n=2):  # (made on the device: the data are not the layer's to move)
        return (torch.randn(n, 3, 6, 6, generator=gen) if device == 'cpu'
                else torch.randn(n, 3, 6, 6, device=device))

    for i in range(steps):
        xs = [batch(0 if i == empty_at else 2) for _ in range(calls)]
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            if two_pass:
                with cbn_plugin.statistics_pass(model):
                    for x in xs:
                        model(x)
            for x in xs:
                out = model(x)
                out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        cbn_plugin.step(model)
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        if empty_step and not two_pass:
            model(torch.empty(0, 3, 6, 6, device=device)).float().sum().backward()
            opt.zero_grad()
            cbn_plugin.step(model)
        model.eval()
        model(batch())
        model.train()


# ---------------------------------------------------------------- kernel contracts
@pytest.mark.parametrize('dtype', [
    pytest.param(name, marks=pytest.mark.skipif(
        dtype is not None and not cpu_trains_in(dtype),
        reason=f'this torch has no {name} CPU autocast (torch 2.1: bfloat16 only)'))
    for name, dtype in sorted(AUTOCAST.items())])
@pytest.mark.parametrize('mode', sorted(MODES))
def test_every_kernel_call_meets_its_cuda_contract(mode, dtype):
    model, opt = build(mode)
    with KernelContracts() as seen:
        train(model, opt, 6, dtype=AUTOCAST[dtype])
    assert not seen.violations, '\n'.join(f'{m}\n{w}' for m, w in seen.violations[:2])
    # The step ran the pooled path: its backward is the one the contract is about.
    assert seen.calls.get('aten.native_batch_norm_backward.default', 0) > 0
    assert model.bn1.window_mean is not None and model.bn1.window_mean.dtype == torch.float32


def test_the_contracts_catch_what_cuda_refuses():
    """Each rule fails on the call it is there to refuse (the issue's crash among them)."""
    bnb = torch.ops.aten.native_batch_norm_backward.default
    x, g = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    w, m, v = torch.ones(3), torch.zeros(3), torch.ones(3)
    undefined = contract_violations(bnb, (g, x, w, m, v, None, None, False, 1e-5,
                                          [False, True, True]), {})
    assert any('save_mean should always be defined' in u for u in undefined)
    assert contract_violations(bnb, (g, x, w, None, None, m, v, True, 1e-5,
                                     [False, True, True]), {}) == []
    no_weight = contract_violations(bnb, (g, x, None, None, None, m, v, True, 1e-5,
                                          [False, True, True]), {})
    assert any('no weight' in u for u in no_weight)
    half = x.half()
    assert contract_violations(bnb, (g.half(), half, w, None, None, m, v, True, 1e-5,
                                     [False, True, True]), {}) == []
    mixed = contract_violations(bnb, (g, half, w.half(), None, None, m, v, True, 1e-5,
                                      [False, True, True]), {})
    assert any('grad_out' in u for u in mixed) and any('dtypes' in u for u in mixed)
    assert contract_violations(torch.ops.aten.mm.default, (w.view(1, 3), m.half().view(3, 1)),
                               {})


def _sync_kernel_calls(rank):
    found = {}
    for mode in ('default', 'paper'):
        for dtype in ('float32', 'bfloat16'):
            args = dict(MODES[mode][0])
            torch.manual_seed(0)
            model = Net(SyncCBN, **args)
            cbn_plugin.bind(model, logger=None)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            with KernelContracts() as seen:
                # rank 1 has an empty batch at step 3 (it still joins both reductions)
                train(model, opt, 5, dtype=AUTOCAST[dtype], calls=1, empty_step=False,
                      empty_at=3 if rank == 1 else None)
            found[mode, dtype] = ([m for m, _ in seen.violations],
                                  seen.calls.get('aten.native_batch_norm_backward.default'))
    return found


def test_sync_cbn_kernel_calls_meet_their_cuda_contract(tmp_path):
    for rank, found in enumerate(on_two_ranks(tmp_path, _sync_kernel_calls)):
        for key, (violations, backwards) in found.items():
            assert violations == [], (rank, key, violations[0])
            assert backwards, (rank, key)


# ---------------------------------------------------------------- device hygiene
@pytest.fixture
def meta_device(monkeypatch):
    """The layer asks whether autocast is on for its input's device; ``meta`` has no
    autocast (torch raises for the question): it answers no."""
    asked = compat.is_autocast_enabled
    monkeypatch.setattr(compat, 'is_autocast_enabled',
                        lambda device: False if device == 'meta' else asked(device))


@pytest.mark.parametrize('mode', ['default', 'paper', 'naive', 'two-pass', 'per-call', 'ramp',
                                  'burn-in', 'no-affine', 'sync-without-group'])
def test_a_step_on_a_device_makes_nothing_on_the_host(mode, meta_device):
    """Two steps on the CPU, the model moved to ``meta`` (``model.to``, as ``.cuda()``),
    then steps past burn-in and through the ramp there: every tensor the layer makes
    is made on the device, nothing is copied to it and no op mixes devices."""
    model, _ = build(mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train(model, opt, 2, empty_step=False)
    model.to('meta')
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with DeviceChecker() as checker:
        train(model, opt, 7, device='meta')
    assert not checker.found, checker.report()
    assert model.bn1.window_mean.device.type == 'meta'
    assert model.bn1.steps_done == 10 - (mode == 'two-pass')


def test_the_device_checker_catches_a_host_tensor(meta_device):
    """The oracle fails on what it is there to catch: a mask made on the host and
    moved, and a host tensor mixed into a device op."""
    with DeviceChecker() as checker:
        x = torch.zeros(4, device='meta')
        mask = torch.zeros(4, dtype=torch.bool)
        mask[[0, 2]] = True
        x.masked_fill(mask.to('meta'), 1.0)
        with pytest.raises(RuntimeError, match='not on the expected device'):
            x + torch.ones(4)  # (meta refuses it too, as CUDA would)
    whats = {what for what, _, _ in checker.found}
    assert whats == {'a tensor made on the host', 'a tensor from host data',
                     'a host-to-device copy', "devices mixed (['cpu', 'meta'])"}, whats


def test_sync_cbn_shift_follows_the_module():
    layer = SyncCBN(4, window_size=3)
    layer.stats_shift = torch.ones(4)
    layer.half()
    assert layer.stats_shift.dtype == torch.float32
    layer.to('meta')
    assert layer.stats_shift.device.type == 'meta'


# ---------------------------------------------------------------- model.half()
@pytest.mark.skipif(not cpu_trains_in(torch.float16),
                    reason="this torch's CPU BN has no float16 backward (torch 2.1)")
def test_half_after_the_window_exists_keeps_float32_statistics():
    """``model.half()`` casts every floating buffer; the window's entries stay float32 (the
    statistics of a float16 input are float32), and training goes on in float16."""
    model, opt = build('default')
    train(model, opt, 4, empty_step=False)
    model.half()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        out = model(torch.randn(2, 3, 6, 6, generator=gen).half())
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        cbn_plugin.step(model)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    for name in ('window_mean', 'window_var', 'window_grad_mean', 'window_grad_var'):
        assert getattr(model.bn1, name).dtype == torch.float32, name
    assert all(torch.isfinite(p).all() for p in model.parameters())
