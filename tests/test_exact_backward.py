"""The compensated backward against a float64 brute force that differentiates the forward.

The oracle (``exact_oracle.ExactOracle``) keeps every past conv input and
weight and rebuilds each past step's entry as a differentiable function of
the *current* conv weight and bias; autograd then gives the gradient of the
whole window. Nothing is shared with the plugin's implementation. Earlier
calls of the same step (gradient accumulation) are entries taken with the
current weights: recomputed through the current conv, their inputs fixed.
"""
import copy

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import CBN
from cbn_plugin import functional as CF
from exact_oracle import ExactOracle
from oracle import sgd_in_lockstep


class TwoLayer(nn.Module):
    """conv -> CBN -> relu -> conv -> CBN; optionally a conv bias and a grouped conv."""

    def __init__(self, conv_bias=False, groups=1, dilation=1, **cbn):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, padding=dilation, dilation=dilation, bias=conv_bias)
        self.bn1 = CBN(6, **cbn)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=groups, bias=conv_bias)
        self.bn2 = CBN(4, **cbn)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def run(window_size, rho, rule, compensation, conv_bias=False, groups=1, calls=1, steps=10,
        lr=0.2, seed=0, backward='compensated', oracle_cls=ExactOracle, dilation=1,
        track_diagnostics=False, accumulation='merge'):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TwoLayer(conv_bias, groups, dilation, window_size=window_size, rho=rho,
                     variance_rule=rule,
                     compensation=compensation, stats_backward=backward,
                     accumulation=accumulation).double()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.add_(0.3 * torch.randn(bn.weight.shape, generator=gen, dtype=torch.float64))
            bn.bias.add_(0.3 * torch.randn(bn.bias.shape, generator=gen, dtype=torch.float64))
    cbn_plugin.bind(model, logger=None)
    model.bn1.track_diagnostics = model.bn2.track_diagnostics = track_diagnostics
    ref = copy.deepcopy(model)
    o1 = oracle_cls(ref.conv1, ref.bn1.weight, ref.bn1.bias, window_size, rho, rule, compensation,
                    accumulation=accumulation)
    o2 = oracle_cls(ref.conv2, ref.bn2.weight, ref.bn2.bias, window_size, rho, rule, compensation,
                    accumulation=accumulation)
    params, ref_params = list(model.parameters()), list(ref.parameters())
    for _ in range(steps):
        for _ in range(calls):
            # A large shared offset, so that the window really differs from the batch.
            x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1
            target = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)
            x_ref = x.clone().requires_grad_(True)
            x.requires_grad_(True)
            out, out_ref = model(x), o2(torch.relu(o1(x_ref)))
            torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-9)
            (out * target).sum().backward()
            (out_ref * target).sum().backward()
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-8, atol=1e-9)
        # Every parameter: both convs' weights (and biases), both norms' affine.
        sgd_in_lockstep(params, ref_params, lr, rtol=1e-7, atol=1e-9)
        cbn_plugin.step(model)  # (the layer updates its running statistics here)
        o1.step()
        o2.step()
        if calls == 1:
            for bn, orc in ((model.bn1, o1), (model.bn2, o2)):
                torch.testing.assert_close(bn.running_mean, orc.running_mean, rtol=1e-9,
                                           atol=1e-12)
                torch.testing.assert_close(bn.running_var, orc.running_var, rtol=1e-9,
                                           atol=1e-12)
    return model


@pytest.mark.parametrize('compensation', ['mu_nu', 'var'])
@pytest.mark.parametrize('rule', ['clamp', 'exclude'])
@pytest.mark.parametrize('rho', [0.5, 1.0])
@pytest.mark.parametrize('window_size', [2, 4])
def test_exact_backward_matches_brute_force(window_size, rho, rule, compensation):
    run(window_size, rho, rule, compensation)


@pytest.fixture(params=['product_and_sum', 'batched_product'])
def slot_combination(request, monkeypatch):
    """Both ways ``_slot_combination`` sums the slots' ``dvar/dW``: the threshold decides
    by size, and the tests' windows are small, so the second is forced here."""
    if request.param == 'batched_product':
        monkeypatch.setattr(CF, '_TEMPORARY_NUMEL', 0)
    return request.param


@pytest.mark.parametrize('compensation', ['mu_nu', 'var'])
def test_exact_backward_conv_bias_and_groups(compensation, slot_combination):
    run(4, 1.0, 'clamp', compensation, conv_bias=True, groups=2)
    run(3, 0.5, 'exclude', compensation, conv_bias=True, groups=2, seed=1)
    run(3, 1.0, 'clamp', compensation, conv_bias=True, dilation=2, seed=2)


@pytest.mark.parametrize('compensation', ['mu_nu', 'var'])
def test_exact_backward_gradient_accumulation(compensation):
    """Three calls per step: the earlier calls' statistics carry their weight gradient too."""
    run(3, 1.0, 'clamp', compensation, conv_bias=True, calls=3, steps=6)


@pytest.mark.parametrize('accumulation', ['merge', 'own'])
def test_exact_backward_four_micro_batches(accumulation):
    """Four calls per step (1 x 4 accumulation), each way of pooling the step's calls:
    the backward is the gradient of what the forward computed."""
    run(4, 1.0, 'clamp', 'var', calls=4, steps=5, accumulation=accumulation)
    run(3, 0.5, 'exclude', 'mu_nu', conv_bias=True, calls=4, steps=4, seed=1,
        accumulation=accumulation)


def test_oracle_tells_the_accumulation_variants_apart():
    """Mutation check: the layer pooling the earlier calls is caught by the oracle that
    does not, and the other way round."""
    class OwnOracle(ExactOracle):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, 'accumulation': 'own'})

    with pytest.raises(AssertionError):
        run(3, 1.0, 'clamp', 'var', calls=2, steps=3, oracle_cls=OwnOracle)


def test_exact_backward_sees_negative_entries():
    """The runs above exercise the variance rule: some compensated entries are negative."""
    model = run(4, 1.0, 'clamp', 'mu_nu', lr=0.6, steps=8, track_diagnostics=True)
    assert float(model.bn2.diagnostics['negative_fraction']) + float(
        model.bn1.diagnostics['negative_fraction']) > 0
    # Not tracked: the figures cost nothing and are absent.
    model.bn1.track_diagnostics = False
    model.bn1.train()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    model(x).sum().backward()
    cbn_plugin.step(model)
    assert 'negative_fraction' not in model.bn1.diagnostics


class DetachedPastOracle(ExactOracle):
    """The oracle with the past entries held constant: the paper's backward."""

    def past_entry(self, inputs, old_w, old_b):
        return tuple(t.detach() for t in super().past_entry(inputs, old_w, old_b))


def test_oracle_fails_without_the_past_entry_term():
    """Mutation check: dropping the past entries' gradient (the paper's 'current') is caught."""
    with pytest.raises(AssertionError):
        run(4, 1.0, 'clamp', 'var', backward='current')
    with pytest.raises(AssertionError):
        run(4, 1.0, 'clamp', 'var', oracle_cls=DetachedPastOracle)
    # ... and the paper's backward is exactly the detached oracle's gradient.
    run(4, 1.0, 'clamp', 'var', backward='current', oracle_cls=DetachedPastOracle)


@pytest.mark.parametrize('rule', ['clamp', 'exclude'])
@pytest.mark.parametrize('form', ['mu_nu', 'var'])
def test_gradcheck_compensated_pool(form, rule, slot_combination):
    """The pooled statistics' written-out derivative in the conv weight and bias, grouped
    conv, slots in and out of use. (A step's earlier calls enter as values taken with the
    current weight, not recomputed from it here: the brute-force oracle covers them.)"""
    gen = torch.Generator().manual_seed(3)
    k, groups, cg, p = 3, 2, 3, 5
    c = groups * cg

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    use = torch.tensor([[True], [False], [True]])
    entries = CF.WindowEntries(rnd(k, c), rnd(k, c).abs() + 0.5, rnd(k, groups, p),
                               rnd(k, c, p), use)
    step_mean, step_var = rnd(c), rnd(c).abs() + 0.5
    weight = rnd(c, p).view(c, p, 1, 1).requires_grad_(True)
    bias = rnd(c).requires_grad_(True)

    def f(w, b):
        pooled = CF.pool_compensated(step_mean, step_var, entries, w, b, 0.7, form, rule,
                                     differentiable=True)
        return pooled.mean, pooled.var

    assert torch.autograd.gradcheck(f, (weight, bias))


def test_gradcheck_layer_compensated_backward():
    """gradcheck through a whole CBN step with a full window (input, conv and affine)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=True).double()
    bn = CBN(3, window_size=3).double()
    model = nn.Sequential(conv, bn)
    cbn_plugin.bind(model, logger=None)
    for _ in range(3):
        model(torch.randn(2, 2, 4, 4, dtype=torch.float64)).sum().backward()
        with torch.no_grad():
            conv.weight.add_(0.05 * torch.randn_like(conv.weight))
        cbn_plugin.step(model)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    weight = conv.weight

    def f(inp, w):
        # The window is read, not written, by a forward: calls are repeatable in a step.
        saved = conv.weight
        del conv.weight
        conv.weight = w
        try:
            bn.discard_step()
            return (model(inp) * target).sum()
        finally:
            del conv.weight
            conv.weight = saved

    assert torch.autograd.gradcheck(f, (x, weight.detach().clone().requires_grad_(True)))


def test_sampled_derivatives_give_a_close_compensated_gradient():
    """dvar_stride > 1: the backward uses the estimated dvar/dW, close to the exact one."""
    def conv_grad(stride, backward='compensated'):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                              CBN(16, window_size=4, dvar_stride=stride,
                                  stats_backward=backward)).double()
        cbn_plugin.bind(model, logger=None)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(5):
            x = torch.randn(2, 8, 16, 16, generator=gen, dtype=torch.float64) + 1
            target = torch.randn(2, 16, 16, 16, generator=gen, dtype=torch.float64)
            opt.zero_grad()
            (model(x) * target).sum().backward()
            grad = model[0].weight.grad.clone()
            opt.step()
            cbn_plugin.step(model)
        return grad

    exact, sampled, paper = conv_grad(1), conv_grad(2), conv_grad(1, 'current')
    # The past entries' term is a real part of the gradient ...
    assert (exact - paper).norm() > 0.1 * exact.norm()
    # ... and the estimate keeps it: much closer to the exact gradient than the paper's.
    assert (sampled - exact).norm() < 0.25 * (paper - exact).norm()
