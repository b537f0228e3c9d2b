"""Several forwards between two optimizer steps: pooled into one slot, or one window per call."""
import copy

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import CBN
from exact_oracle import ExactOracle
from oracle import OracleCBN, sgd_in_lockstep


def shared_head(per_call_windows, window_size=3, mode='paper'):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False),
                         CBN(6, window_size=window_size, per_call_windows=per_call_windows,
                             mode=mode))
    cbn_plugin.bind(head, logger=None)
    return head.double()


def levels(gen):
    # Two "FPN levels" with very different statistics.
    return (torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) * 3 + 4,
            torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64) * 0.5 - 1)


@pytest.mark.parametrize('mode', ['paper', 'default'])
def test_per_call_windows_keep_levels_apart(mode):
    """Each call position behaves exactly like its own CBN over its own level.

    In the default mode each level's past entries pass gradient to the shared
    conv: the brute force differentiates every level's window.
    """
    gen = torch.Generator().manual_seed(1)
    head = shared_head(per_call_windows=True, mode=mode)
    ref = copy.deepcopy(head)
    conv, bn = ref[0], ref[1]
    if mode == 'paper':
        oracles = [OracleCBN(conv, bn.weight, bn.bias, 3, 1.0, 'clamp') for _ in range(2)]
    else:
        oracles = [ExactOracle(conv, bn.weight, bn.bias, 3, 1.0, 'clamp', 'var')
                   for _ in range(2)]
    for _ in range(8):
        xs = levels(gen)
        outs = [head(x) for x in xs]
        refs = [oracle(x) for oracle, x in zip(oracles, xs)]
        for out, expect in zip(outs, refs):
            torch.testing.assert_close(out, expect, rtol=1e-9, atol=1e-9)
        sum(o.pow(2).mean() for o in outs).backward()
        sum(r.pow(2).mean() for r in refs).backward()
        sgd_in_lockstep(list(head.parameters()), list(ref.parameters()), 0.3, rtol=1e-8,
                        atol=1e-9)
        cbn_plugin.step(head)
        for oracle in oracles:
            oracle.step()
    layer = head[1]
    assert layer.window_mean.shape[:2] == (2, 2)
    # Each position advanced once per step, not once per call.
    assert layer.window_filled.tolist() == [2, 2] and layer.steps_done == 8


def test_pooled_calls_differ_from_per_level_windows():
    """The default pools both levels into one slot: not the per-level result."""
    pooled, per_call = shared_head(per_call_windows=False), shared_head(per_call_windows=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        xs = levels(gen)
        outs = [(pooled(x), per_call(x)) for x in xs]
        cbn_plugin.step(pooled)
        cbn_plugin.step(per_call)
    assert pooled[1].window_mean.shape[0] == 1 and per_call[1].window_mean.shape[0] == 2
    assert not torch.allclose(*outs[1], atol=1e-3)


def perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize('rho', [1.0, 0.0])
def test_pooling_two_half_batches_equals_one_full_batch(rho):
    """Gradient accumulation: the step's slot holds the full batch's statistics."""
    torch.manual_seed(0)
    full = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False),
                         CBN(5, window_size=3, rho=rho)).double()
    halves = copy.deepcopy(full)
    cbn_plugin.bind(full, logger=None)
    cbn_plugin.bind(halves, logger=None)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        x = torch.randn(4, 3, 9, 9, generator=gen, dtype=torch.float64) * 2 + 1
        full(x)
        halves(x[:2])
        halves(x[2:])
        cbn_plugin.step(full)
        cbn_plugin.step(halves)
        # Same (non-gradient) weight change on both, so the windows stay comparable.
        perturb(full, step)
        perturb(halves, step)
    state_full, state_halves = full.state_dict(), halves.state_dict()
    # One running-statistics update per step, from the whole step: as the full batch.
    for name in ('1.window_mean', '1.window_var', '1.window_grad_mean', '1.window_grad_var',
                 '1.running_mean', '1.running_var'):
        if name in state_full:
            torch.testing.assert_close(state_halves[name], state_full[name], rtol=1e-10,
                                       atol=1e-12, msg=name)
    x = torch.randn(4, 3, 9, 9, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(halves(x), full(x), rtol=1e-10, atol=1e-10)


def test_second_half_batch_sees_the_first():
    """Within a step, a later call normalises with the earlier calls' statistics merged in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 1, bias=False), CBN(5, window_size=2)).double()
    cbn_plugin.bind(model, logger=None)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    x[2:] += 5
    model(x[:2])
    out = model(x[2:])
    conv_out = model[0](x).detach()
    mean = conv_out.mean(dim=(0, 2, 3), keepdim=True)
    var = conv_out.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    bn = model[1]
    expect = (conv_out[2:] - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) \
        + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)
