"""CBN against the brute-force oracle: outputs, gradients and running stats over SGD steps."""
import copy

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import CBN
from oracle import OracleCBN, compensated_moments, sgd_in_lockstep


class TwoLayer(nn.Module):
    """conv -> CBN -> relu -> conv -> CBN: two bound pairs, the second fed through the first."""

    def __init__(self, conv_bias=False, **cbn):
        super().__init__()
        cbn.setdefault('mode', 'paper')  # the oracle is the paper's algorithm
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=conv_bias)
        self.bn1 = CBN(6, **cbn)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False)
        self.bn2 = CBN(5, **cbn)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def perturb_affine(model, gen):
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.add_(0.3 * torch.randn(bn.weight.shape, generator=gen, dtype=torch.float64))
            bn.bias.add_(0.3 * torch.randn(bn.bias.shape, generator=gen, dtype=torch.float64))


def run_against_oracle(window_size, rho, rule, conv_bias=False, steps=12, lr=0.2, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TwoLayer(conv_bias, window_size=window_size, rho=rho, variance_rule=rule).double()
    perturb_affine(model, gen)
    cbn_plugin.bind(model, logger=None)
    ref = copy.deepcopy(model)  # its convs and affine parameters, driven by the oracle
    o1 = OracleCBN(ref.conv1, ref.bn1.weight, ref.bn1.bias, window_size, rho, rule)
    o2 = OracleCBN(ref.conv2, ref.bn2.weight, ref.bn2.bias, window_size, rho, rule)
    ref_params = [ref.conv1.weight, ref.conv2.weight, ref.bn1.weight, ref.bn1.bias,
                  ref.bn2.weight, ref.bn2.bias] + ([ref.conv1.bias] if conv_bias else [])
    params = [model.conv1.weight, model.conv2.weight, model.bn1.weight, model.bn1.bias,
              model.bn2.weight, model.bn2.bias] + ([model.conv1.bias] if conv_bias else [])
    for _ in range(steps):
        # Inputs with a large shared offset, so the window really differs from the batch.
        x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1
        target = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64)
        x_ref = x.clone().requires_grad_(True)
        x = x.requires_grad_(True)
        out = model(x)
        out_ref = o2(torch.relu(o1(x_ref)))
        torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-9)
        (out * target).sum().backward()
        (out_ref * target).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
        sgd_in_lockstep(params, ref_params, lr, rtol=1e-8, atol=1e-9)
        cbn_plugin.step(model)  # (the layer updates its running statistics here)
        o1.step()
        o2.step()
        for bn, orc in ((model.bn1, o1), (model.bn2, o2)):
            torch.testing.assert_close(bn.running_mean, orc.running_mean, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(bn.running_var, orc.running_var, rtol=1e-9, atol=1e-12)
    return model, (o1, o2)


@pytest.mark.parametrize('window_size', [2, 4])
@pytest.mark.parametrize('rho', [0.0, 0.5, 1.0])
def test_matches_oracle_clamp(window_size, rho):
    run_against_oracle(window_size, rho, 'clamp')


@pytest.mark.parametrize('window_size', [2, 4])
@pytest.mark.parametrize('rho', [0.0, 0.5, 1.0])
def test_matches_oracle_exclude(window_size, rho):
    run_against_oracle(window_size, rho, 'exclude')


def test_exclude_rule_really_drops_entries():
    # Large steps make the first-order nu fall below mu^2; the oracle must have
    # dropped entries, or the exclude comparisons above prove nothing.
    _, oracles = run_against_oracle(4, 1.0, 'exclude', lr=3.0, steps=10, seed=3)
    assert sum(o.entries_dropped for o in oracles) > 0


def test_conv_bias_is_compensated():
    run_against_oracle(4, 1.0, 'clamp', conv_bias=True)


def test_mean_compensation_is_exact():
    """For a CBN right after the first conv, the compensated window mean is the
    mean of the old batches pushed through the new weights."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True).double()
    bn = CBN(8, window_size=4, mode='paper').double()
    model = nn.Sequential(conv, bn)
    cbn_plugin.bind(model, logger=None)
    batches = [torch.randn(2, 3, 7, 5, dtype=torch.float64) + 3 for _ in range(4)]
    for x in batches[:3]:
        model(x).pow(3).sum().backward()
        with torch.no_grad():
            for p in conv.parameters():
                p -= 0.5 * p.grad
                p.grad = None
        cbn_plugin.step(model)
    model(batches[3])
    mean_c, _, valid = bn.past_entries()
    assert bool(valid.all()) and mean_c.shape[0] == 3
    # Newest first: the old batches through today's conv.
    with torch.no_grad():
        expect = torch.stack([conv(x).mean(dim=(0, 2, 3)) for x in batches[2::-1]])
    torch.testing.assert_close(mean_c, expect, rtol=1e-12, atol=1e-12)


def test_compensation_matches_autograd_derivatives_grouped_conv():
    """Grouped, dilated, strided conv: the cheap derivatives give the oracle's (mu, nu)."""
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=True).double()
    bn = CBN(6, window_size=2, mode='paper').double()
    model = nn.Sequential(conv, bn)
    cbn_plugin.bind(model, logger=None)
    x_old = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    old_w, old_b = conv.weight.detach().clone(), conv.bias.detach().clone()
    model(x_old)
    cbn_plugin.step(model)
    with torch.no_grad():
        conv.weight.add_(0.2 * torch.randn_like(conv.weight))
        conv.bias.add_(0.2 * torch.randn_like(conv.bias))
    model(torch.randn(3, 4, 9, 8, dtype=torch.float64))
    mean_c, var_c, _ = bn.past_entries()
    mu, nu = compensated_moments(x_old, old_w, old_b, conv.weight, conv.bias, conv, 1.0)
    torch.testing.assert_close(mean_c[0], mu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var_c[0], torch.clamp_min(nu - mu * mu, 0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('stride', [1, 2, 3])
@pytest.mark.parametrize('batch, size', [(2, (13, 11)), (23, (5, 4))])
def test_dvar_dw_exact_and_sampled_against_autograd(stride, batch, size):
    """dvar/dW: exact for stride 1; for stride s, the derivative of the variance over
    every s-th output row and column (every s^2-th sample when the batch has more
    samples than a map has positions), corrected along W so <g, W> = 2 var holds."""
    from cbn_plugin import functional as CF
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True).double()
    x = torch.randn(batch, 3, *size, dtype=torch.float64) + 2
    w = conv.weight.detach().clone().requires_grad_(True)
    out = nn.functional.conv2d(x, w, conv.bias, conv.stride, conv.padding)
    mean = out.mean(dim=(0, 2, 3), keepdim=True)
    if batch > out.shape[2] * out.shape[3]:  # 23 maps of 3x2 positions
        sampled = out[::stride * stride]
    else:
        sampled = out[:, :, ::stride, ::stride]
    var_sampled = ((sampled - mean) ** 2).mean(dim=(0, 2, 3))
    expect = torch.autograd.grad(var_sampled.sum(), w)[0].flatten(1)
    var = out.detach().var(dim=(0, 2, 3), unbiased=False)
    flat_w = w.detach().flatten(1)
    if stride > 1:
        gap = 2 * var - (expect * flat_w).sum(1)
        expect = expect + (gap / (flat_w * flat_w).sum(1)).unsqueeze(1) * flat_w
    _, grad_var = CF.conv_stat_grads(x, out.detach(), mean.flatten(), var, conv, stride)
    torch.testing.assert_close(grad_var, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((grad_var * flat_w).sum(1), 2 * var, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('batch, size', [(4, 64), (256, 7)])
def test_sampled_mode_stays_close_to_exact(batch, size):
    """dvar_stride=2 keeps the means exact and the compensated variances near exact,
    sampling rows and columns of large maps (4 x 64x64) or the samples of a batch
    of small ones (256 RoI-like 7x7 maps).

    The estimate's error shrinks like 1/sqrt(positions): measured here, its
    share of the compensation is 0.47 at 16x16, 0.18 at 32x32, 0.09 at 64x64
    (4 maps), and 0.10 for 256 maps of 7x7.
    """
    torch.manual_seed(0)
    exact = TwoLayer(window_size=4).double()
    sampled = copy.deepcopy(exact)
    sampled.bn1.dvar_stride = sampled.bn2.dvar_stride = 2
    for model in (exact, sampled):
        cbn_plugin.bind(model, logger=None)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64) * 2 + 1
        exact(x), sampled(x)
        for model in (exact, sampled):
            cbn_plugin.step(model)
            with torch.no_grad():  # the same weight change for both
                noise = torch.Generator().manual_seed(step)
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=noise, dtype=p.dtype))
    x = torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64)
    exact(x), sampled(x)
    # The first layer sees identical inputs in both models (the second does not:
    # its input went through the first layer's pooled statistics).
    mean_s, var_s, _ = sampled.bn1.past_entries()
    mean_e, var_e, _ = exact.bn1.past_entries()
    torch.testing.assert_close(mean_s, mean_e, rtol=1e-12, atol=1e-12)
    assert not torch.equal(var_s, var_e)
    # It recovers most of the compensation: far closer than the uncompensated entries.
    var_old = exact.bn1.window_var[0, list(exact.bn1.past_slots())]
    error = (var_s - var_e).abs().mean()
    compensation = (var_old - var_e).abs().mean()
    assert error < 0.2 * compensation, (float(error), float(compensation))


def test_pooled_stats_backward_is_bn_backward_with_the_pooled_statistics():
    torch.manual_seed(5)
    model = TwoLayer(window_size=3, stats_backward='pooled').double()
    cbn_plugin.bind(model, logger=None)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        model(torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)).sum().backward()
        cbn_plugin.step(model)
    bn = model.bn2
    captured = {}
    handle = bn.register_forward_hook(lambda m, args, out: captured.update(x=args[0], y=out))
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    model(x)
    handle.remove()
    grad = torch.randn_like(captured['y'])
    dx, = torch.autograd.grad(captured['y'], captured['x'], grad)
    # The pooled statistics, from the layer's past entries and this batch, pooled here
    # by the textbook formula (mean of the entries' means; mean variance plus the
    # spread of the means), per channel over the entries the layer kept.
    mean_past, var_past, valid = bn.past_entries()
    x_now = captured['x'].detach()
    means = torch.cat([x_now.mean(dim=(0, 2, 3))[None], mean_past])
    variances = torch.cat([x_now.var(dim=(0, 2, 3), unbiased=False)[None], var_past])
    weights = torch.cat([torch.ones_like(valid[:1]), valid]).double()
    mean = (weights * means).sum(0) / weights.sum(0)
    var = (weights * (variances + (means - mean) ** 2)).sum(0) / weights.sum(0)
    expect = torch.ops.aten.native_batch_norm_backward(
        grad, captured['x'].detach(), bn.weight.detach(), None, None, mean,
        torch.rsqrt(var + bn.eps), True, bn.eps, [True, False, False])[0]
    torch.testing.assert_close(dx, expect, rtol=1e-10, atol=1e-12)
