"""The running statistics of pooled steps, made at the step's end for every layer at once.

A pooled step's running-statistics update is left to ``cbn_plugin.step(model)``, which
makes every layer's in a few foreach ops (``functional.running_updates``). The oracle is
a float64 brute force: with ``rho = 0`` and weights that do not move, the window pools
exactly the conv outputs of the steps in it (each step an entry of equal weight), so each
layer's running statistics are BN's running average of their pooled mean and variance.
"""
import copy

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import CBN

WINDOW = 3


def stack(momenta, options=({}, {}, {})):
    torch.manual_seed(0)
    widths = [3, 4, 6, 5]
    layers = []
    for cin, cout, momentum, extra in zip(widths, widths[1:], momenta, options):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                   CBN(cout, window_size=WINDOW, rho=0.0, momentum=momentum, **extra), nn.ReLU()]
    model = nn.Sequential(*layers).double()
    cbn_plugin.bind(model, logger=None)
    return model


def pooled(entries):
    """The window's pooled mean and variance of equally weighted entries (each a
    ``N x C x H x W`` tensor of positions), the variance unbiased by the positions the
    layer counts (the entries times the newest one's)."""
    means = torch.stack([e.mean(dim=(0, 2, 3)) for e in entries])
    variances = torch.stack([e.var(dim=(0, 2, 3), unbiased=False) for e in entries])
    mean = means.mean(0)
    var = (variances + (means - mean) ** 2).mean(0)
    total = len(entries) * entries[-1].numel() / entries[-1].shape[1]
    return mean, var * total / (total - 1)


def expected_running(calls, momentum, per_call_windows=False):
    """BN's running average of the pooled statistics (``calls``: per step, the layer's
    input at each call). A fixed momentum: one update per step, from the step's last
    call (which pools all its calls); a cumulative average: one per call. Per-call
    windows: each call its own window of the same call in past steps, and its update."""
    mean = torch.zeros(calls[0][0].shape[1], dtype=torch.float64)
    var = torch.ones_like(mean)
    tracked = 0
    for step, inputs in enumerate(calls):
        steps = calls[max(0, step - WINDOW + 1):step]
        counted = range(len(inputs)) if momentum is None or per_call_windows \
            else [len(inputs) - 1]
        tracked += len(inputs) - len(counted)
        for c in counted:
            tracked += 1
            if per_call_windows:
                entries = [past[c] for past in steps] + [inputs[c]]
            else:
                entries = [torch.cat(past) for past in steps] + [torch.cat(inputs[:c + 1])]
            target_mean, target_var = pooled(entries)
            factor = 1.0 / tracked if momentum is None else momentum
            mean = mean + factor * (target_mean - mean)
            var = var + factor * (target_var - var)
    return mean, var


@pytest.mark.parametrize('calls, per_call_windows', [(1, False), (2, False), (2, True)])
def test_running_statistics_are_the_pooled_windows_running_average(calls, per_call_windows):
    """Three layers of different widths and momenta (one a cumulative average), one
    step for the model at a time; with two micro-batches per step a fixed momentum
    makes one update per step, from the whole step's statistics, and a cumulative
    average one per call; with a window per call, one per call in call order."""
    momenta = (0.1, None, 0.3)
    model = stack(momenta, [dict(per_call_windows=per_call_windows)] * 3)
    inputs = {i: [] for i, m in enumerate(model) if isinstance(m, CBN)}
    for i in inputs:
        model[i].register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].detach()))
    gen = torch.Generator().manual_seed(1)
    steps = 6
    for _ in range(steps):
        for _ in range(calls):
            model(torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1)
        cbn_plugin.step(model)
    for (i, seen), momentum in zip(inputs.items(), momenta):
        per_step = [seen[s * calls:(s + 1) * calls] for s in range(steps)]
        mean, var = expected_running(per_step, momentum, per_call_windows)
        torch.testing.assert_close(model[i].running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model[i].running_var, var, rtol=1e-12, atol=1e-12)
        assert int(model[i].num_batches_tracked) == steps * calls


def test_stepping_the_model_equals_stepping_each_layer():
    """The model's step batches the layers' updates and window writes; stepping each
    layer on its own gives the same state, bit for bit: several calls per step under a
    cumulative average (each call counts), per-call windows, both running sources."""
    model = stack((0.1, None, 0.3), ({}, dict(running_stats='batch'),
                                     dict(per_call_windows=True))).float()
    twin = copy.deepcopy(model)
    cbn_plugin.bind(twin, logger=None)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin)]
    gen = torch.Generator().manual_seed(2)
    for _ in range(7):
        xs = [torch.randn(2, 3, 5, 5, generator=gen) for _ in range(2)]
        for net, opt in zip((model, twin), opts):
            for x in xs:
                net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        cbn_plugin.step(model)
        for layer in twin.modules():
            if isinstance(layer, CBN):
                layer.step()
    ours, theirs = model.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def test_a_skipped_or_discarded_step_keeps_its_running_update():
    """GradScaler skipped the optimizer step, or a forward is repeated as the step's
    first: the window forgets the calls, the running statistics keep their update (as
    BN's keep a forward's), made there and not lost."""
    for forget in ('skip_step', 'discard_step'):
        model = stack((0.1, None, 0.3))
        twin = copy.deepcopy(model)
        cbn_plugin.bind(twin, logger=None)
        gen = torch.Generator().manual_seed(3)
        for step in range(4):  # the step before the last is pooled
            x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
            model(x)
            twin(x)
            cbn_plugin.step(twin)
            if step == 3:
                for layer in model.modules():
                    if isinstance(layer, CBN):
                        getattr(layer, forget)()
                        layer.step()  # nothing left to record: only the counters move
            else:
                cbn_plugin.step(model)
        for a, b in zip(model.modules(), twin.modules()):
            if isinstance(a, CBN):
                torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)
                torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=0)
