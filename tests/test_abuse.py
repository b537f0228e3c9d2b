"""Numerical abuse: no NaN or Inf reaches outputs, running statistics or the window.

A bounded, seeded fuzz over hostile inputs and weight changes, plus torch.compile.
"""
import copy

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import CBN
from oracle import sgd_in_lockstep


def hostile_input(kind, gen, shape):
    n, c, h, w = shape
    x = torch.randn(shape, generator=gen)
    if kind == 'zeros':
        return torch.zeros(shape)
    if kind == 'near_constant':
        return 3.0 + 1e-6 * x
    if kind == 'huge_offset':
        return 1e4 + x
    if kind == 'tiny':
        return 1e-20 * x
    if kind == 'huge':
        return 1e15 * x
    if kind == 'overflow':  # x^2 overflows float32: the step's statistics are not finite
        return 1e20 * x
    return x


KINDS = ['normal', 'zeros', 'near_constant', 'huge_offset', 'tiny', 'huge', 'overflow']


def assert_finite_state(layer):
    for name in ('running_mean', 'running_var', 'window_mean', 'window_var',
                 'window_grad_mean', 'window_grad_var'):
        value = getattr(layer, name)
        if value is not None:
            assert torch.isfinite(value).all(), name


# A fixed number of seeded cases (every run checks the same ones, on any machine): both
# kernel sizes, both running-statistics sources, a single-value batch every fifth case.
FUZZ_CASES = 60


@pytest.mark.parametrize('rule', ['clamp', 'exclude'])
def test_fuzz_inputs_and_weight_jumps(rule):
    gen = torch.Generator().manual_seed(0)
    for case in range(FUZZ_CASES):
        torch.manual_seed(case)
        k = int(torch.randint(2, 6, (1,), generator=gen))
        kernel = [1, 3][case % 2]
        model = nn.Sequential(nn.Conv2d(3, 4, kernel, padding=kernel // 2, bias=case % 3 == 0),
                              CBN(4, window_size=k, variance_rule=rule,
                                  running_stats=['batch', 'window'][case % 2]))
        cbn_plugin.bind(model, logger=None)
        for step in range(k + 2):
            kind = KINDS[int(torch.randint(len(KINDS), (1,), generator=gen))]
            # Batch size 1 and single-position batches included once the window has data.
            n, size = ((1, 1) if step > 0 and case % 5 == 0 else (int(torch.randint(1, 4, (1,),
                       generator=gen)), int(torch.randint(2, 5, (1,), generator=gen))))
            x = hostile_input(kind, gen, (n, 3, size, size))
            layer = model[1]
            if n * size * size == 1 and (layer.window_filled is None
                                         or int(layer.window_filled[0]) == 0):
                # Nothing to pool with: the running statistics normalise, unchanged.
                running = layer.running_mean.clone(), layer.running_var.clone()
                out = model(x)
                layer.eval()
                torch.testing.assert_close(out, model(x))
                layer.train()
                torch.testing.assert_close((layer.running_mean, layer.running_var), running)
                cbn_plugin.step(model)  # the step's single value joins the window
                continue
            with torch.no_grad():
                conv_finite = bool(torch.isfinite(model[0](x)).all())
            out = model(x)
            # A conv output that overflowed is beyond any norm; anything finite must stay so.
            assert torch.isfinite(out).all() or not conv_finite, (case, step, kind)
            out.sum().backward()
            with torch.no_grad():  # very large, random weight changes between steps
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 10 ** float(
                        torch.randint(-3, 12, (1,), generator=gen)))
                    p.grad = None
            cbn_plugin.step(model)
            assert_finite_state(model[1])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_low_precision(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), CBN(6, window_size=3))
    cbn_plugin.bind(model, logger=None)
    gen = torch.Generator().manual_seed(1)
    with torch.autocast('cpu', dtype=dtype):
        for kind in KINDS[:4] * 2:
            out = model(hostile_input(kind, gen, (2, 3, 5, 5)))
            assert torch.isfinite(out.float()).all(), kind
            out.float().sum().backward()
            cbn_plugin.step(model)
    assert_finite_state(model[1])
    assert model[1].window_mean.dtype == torch.float32


def test_torch_compile_matches_eager():
    """torch.compile works (graph breaks at the window bookkeeping) and matches eager."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), CBN(8, window_size=3),
                          nn.ReLU())
    eager = copy.deepcopy(model)
    cbn_plugin.bind(model, logger=None)
    cbn_plugin.bind(eager, logger=None)
    compiled = torch.compile(model, backend='aot_eager')
    for _ in range(4):
        x = torch.randn(2, 3, 6, 6)
        out, expect = compiled(x), eager(x)
        torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)
        out.square().sum().backward()
        expect.square().sum().backward()
        sgd_in_lockstep(list(model.parameters()), list(eager.parameters()), 0.1, rtol=1e-5,
                        atol=1e-6)
        cbn_plugin.step(model)
        cbn_plugin.step(eager)
    assert model[1].diagnostics['window'] == 3
