"""Eval, frozen convs, no_grad, non-finite batches, autocast, memory, running statistics."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cbn_plugin
from cbn_plugin import CBN
from cbn_plugin import functional as CF
from oracle import compensated_moments


def warmed_model(window_size=3, steps=4, **cbn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False),
                          CBN(6, window_size=window_size, **cbn))
    cbn_plugin.bind(model, logger=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.randn(2, 3, 5, 5) + 1).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        cbn_plugin.step(model)
    return model


def bn_twin(model):
    twin = copy.deepcopy(model)
    bn = nn.BatchNorm2d(6)
    bn.load_state_dict({k: v for k, v in model[1].state_dict().items()
                        if not k.startswith('window') and k != 'num_steps'})
    twin[1] = bn
    return twin


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b, skip=()):
    assert a.keys() == b.keys()
    for k in a:
        if k not in skip:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('mode', ['eval', 'no_grad', 'frozen_conv'])
def test_behaves_like_bn_and_touches_no_window_state(mode):
    model = warmed_model()
    twin = bn_twin(model)
    before = snapshot(model)
    x = torch.randn(2, 3, 5, 5) * 2
    if mode == 'eval':
        model.eval(), twin.eval()
        out, expect = model(x), twin(x)
    elif mode == 'no_grad':
        with torch.no_grad():
            out, expect = model(x), twin(x)
    else:
        model[0].weight.requires_grad_(False)
        twin[0].weight.requires_grad_(False)
        out, expect = model(x.requires_grad_(True)), twin(x)
        out.sum().backward()  # a grad-carrying input through a frozen conv is fine
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    # Running statistics move as BN's do in training mode; the window does not.
    moved = {'1.running_mean', '1.running_var', '1.num_batches_tracked'} if mode != 'eval' else ()
    assert_same_state(snapshot(model), before, skip=moved)
    assert model[1].past_entries() is None  # the window was not even read
    cbn_plugin.step(model)
    assert int(model[1].window_filled[0]) == int(before['1.window_filled'][0])


def test_non_finite_batch_is_skipped_and_training_continues():
    model = warmed_model()
    before = snapshot(model)
    x = torch.randn(2, 3, 5, 5)
    x[0, 0, 0, 0] = float('inf')
    model(x)
    assert model[1].diagnostics['skipped_records'] == 1
    cbn_plugin.step(model)
    after = snapshot(model)
    # The step takes its slot (the window spans the last k-1 steps) but holds
    # zeros marked invalid; the other slots are untouched.
    slot = int(before['1.window_next'][0])
    assert not bool(after['1.window_valid'][0, slot])
    others = [s for s in range(2) if s != slot]
    for k in ('1.window_mean', '1.window_var', '1.window_grad_var'):
        assert torch.equal(after[k][0, others], before[k][0, others]), k
        assert not after[k][0, slot].any(), k
    assert torch.isfinite(model[1].window_mean).all()
    out = model(torch.randn(2, 3, 5, 5))
    assert torch.isfinite(out).all()
    layer = model[1]
    newest = layer.past_slots().index(slot)
    assert not layer.past_entries().valid[newest].any()  # never pooled
    assert layer.past_entries().valid[1 - newest].all()


@pytest.mark.parametrize('as_bn', ['burn_in', 'window_size_1'])
def test_non_finite_batch_as_plain_bn_keeps_the_running_statistics(as_bn):
    """As plain BN (burn-in, window 1) the layer is BN except that a non-finite
    batch leaves the running statistics as they were (BN's would turn NaN/inf),
    channel by channel."""
    model = warmed_model(window_size=1 if as_bn == 'window_size_1' else 3)
    if as_bn == 'burn_in':
        model[1].set_schedule(burn_in_steps=10 ** 6)
    twin = bn_twin(model)
    x = torch.randn(2, 3, 5, 5)
    model(x), twin(x)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var, rtol=0, atol=0)
    before = model[1].running_mean.clone(), model[1].running_var.clone()
    y = torch.randn(2, 3, 5, 5)
    y[0, 0, 0, 0] = float('inf')  # every output channel of the conv sees it at (0, 0)
    model(y), twin(y)
    assert not torch.isfinite(twin[1].running_mean).all()  # what BN does
    torch.testing.assert_close(model[1].running_mean, before[0], rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, before[1], rtol=0, atol=0)
    z = torch.randn(2, 3, 5, 5)
    model(z)  # and the next finite batch updates them again
    assert not torch.equal(model[1].running_mean, before[0])


def test_autocast_bfloat16_keeps_float32_statistics():
    model = warmed_model(steps=0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        for _ in range(3):
            out = model(torch.randn(2, 3, 5, 5) * 50 + 200)
            out.float().pow(2).mean().backward()
            cbn_plugin.step(model)
        out = model(torch.randn(2, 3, 5, 5) * 50 + 200)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    layer = model[1]
    assert layer.window_mean.dtype == torch.float32 and layer.window_grad_var.dtype == torch.float32
    assert layer.diagnostics['window'] == 3


@pytest.mark.parametrize('groups, kernel', [(1, 3), (1, 1), (4, 3)])
def test_window_memory_is_within_the_bound(groups, kernel):
    k = 4
    model = nn.Sequential(nn.Conv2d(16, 32, kernel, groups=groups, padding=kernel // 2, bias=False),
                          CBN(32, window_size=k))
    cbn_plugin.bind(model, logger=None)
    for _ in range(k + 1):
        model(torch.randn(2, 16, 6, 6)).sum().backward()
        cbn_plugin.step(model)
    conv = model[0]
    weight, patch = conv.weight.numel(), 16 * kernel * kernel
    assert model[1].window_numel() == (k - 1) * (weight + patch + 2 * 32)


def test_running_stats_from_the_window():
    """rho=0 and unchanged weights: the window is the concatenation of the batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False),
                          CBN(4, window_size=2, rho=0.0, momentum=1.0, running_stats='window'))
    cbn_plugin.bind(model, logger=None)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4) * 3 + 1
    model(a)
    cbn_plugin.step(model)
    model(b)
    cbn_plugin.step(model)  # the running statistics are updated at the step's end
    with torch.no_grad():
        both = model[0](torch.cat([a, b]))
    torch.testing.assert_close(model[1].running_mean, both.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model[1].running_var, both.var(dim=(0, 2, 3), unbiased=True))


def test_exclude_never_drops_the_current_entry():
    mean_cur, var_cur = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    mean_past = torch.tensor([[float('nan'), 4.0]])
    var_past = torch.tensor([[-1.0, float('inf')]])
    var_past, valid, _ = CF.apply_variance_rule(mean_past, var_past, 'exclude')
    mean, var, count = CF.pool_window(mean_cur, var_cur, mean_past, var_past, valid)
    assert count.tolist() == [1.0, 1.0]
    torch.testing.assert_close(mean, mean_cur)
    torch.testing.assert_close(var, var_cur)


def test_large_offset_does_not_cancel():
    """|mean| >> std in float32: compensated variances keep their digits.

    With mean ~1e4 and std ~1, E[x^2] - mu^2 in float32 is off by ~10x the
    variance itself; the centred form matches the float64 oracle closely.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False),
                          CBN(3, window_size=3, rho=1.0, compensation='mu_nu'))
    cbn_plugin.bind(model, logger=None)
    conv = model[0]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3, 2).view(3, 2, 1, 1) + 0.01)
    xs = [torch.randn(2, 2, 6, 6) + 1e4 for _ in range(3)]
    history = []
    for x in xs[:2]:
        history.append((x.double(), conv.weight.detach().double().clone()))
        model(x)
        cbn_plugin.step(model)
        with torch.no_grad():
            conv.weight.add_(1e-6 * torch.randn_like(conv.weight))
    model(xs[2])
    _, var_c, valid = model[1].past_entries()
    w = conv.weight.detach().double()
    expect = []
    for x_old, w_old in reversed(history):
        mu, nu = compensated_moments(x_old, w_old, None, w, None, conv, 1.0)
        expect.append(nu - mu * mu)
    assert bool(valid.all())
    torch.testing.assert_close(var_c.double(), torch.stack(expect), rtol=2e-3, atol=1e-6)


def test_single_value_per_channel_seeds_the_window_then_pools():
    """Batch 1 with a 1x1 map: running statistics on the empty-window step, then the window."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), CBN(4, window_size=3))
    cbn_plugin.bind(model, logger=None)
    layer = model[1]
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    running = layer.running_mean.clone(), layer.running_var.clone()
    xs = [torch.randn(1, 3, 1, 1) for _ in range(4)]
    out = model(xs[0])
    expect = (model[0](xs[0]) - running[0].view(1, -1, 1, 1)) / torch.sqrt(
        running[1].view(1, -1, 1, 1) + layer.eps)
    torch.testing.assert_close(out, expect * layer.weight.view(1, -1, 1, 1)
                               + layer.bias.view(1, -1, 1, 1))
    out.sum().backward()
    torch.testing.assert_close((layer.running_mean, layer.running_var), running)
    cbn_plugin.step(model)
    assert int(layer.window_filled[0]) == 1
    for x in xs[1:]:
        out = model(x)
        past = layer.past_entries()
        assert past.mean.shape[0] >= 1
        # Two or more single values pooled: a real per-channel mean and variance.
        pooled_mean = (model[0](x).detach().view(-1) + past.mean.sum(0)) / (1 + past.mean.shape[0])
        y = model[0](x).detach().view(-1)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out.view(-1), layer.bias)  # not collapsed to beta
        assert (torch.sign(out.view(-1) - layer.bias) == torch.sign(
            (y - pooled_mean) * layer.weight)).all()
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        cbn_plugin.step(model)
    assert not torch.allclose(layer.running_var, running[1])  # trained from the window


def test_single_value_per_channel_as_plain_bn_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), CBN(4, window_size=1))
    cbn_plugin.bind(model, logger=None)
    with pytest.raises(ValueError, match=r'one value per channel \(input \(1, 4, 1, 1\)\)'):
        model(torch.randn(1, 3, 1, 1))


def test_version_2_state_is_upgraded_on_load():
    """A state saved before window_valid existed: every filled slot was a finite step."""
    model = warmed_model(window_size=4, steps=2)  # 2 of 3 slots filled
    state = model.state_dict()
    assert state._metadata['1']['version'] == 3
    old = copy.deepcopy(state)
    del old['1.window_valid']
    old._metadata['1']['version'] = 2
    fresh = warmed_model(window_size=4, steps=0)
    fresh.load_state_dict(old)
    layer = fresh[1]
    assert layer.window_valid.tolist() == [[True, True, False]]
    assert (layer.steps_done, layer.window.ring.next, layer.window.ring.filled) == (2, [2], [2])
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # A version-3 state without window_valid is damaged, not old: refused.
    del state['1.window_valid']
    with pytest.raises(RuntimeError, match='window_valid'):
        warmed_model(window_size=4, steps=0).load_state_dict(state)


def test_repr_names_every_hyperparameter():
    text = repr(CBN(8, window_size=3, rho=0.5, mode='paper', dvar_stride=2))
    for part in ('8', 'eps=1e-05', 'momentum=0.1', 'affine=True', 'track_running_stats=True',
                 'window_size=3', 'rho=0.5', "variance_rule='clamp'", "running_stats='batch'",
                 "stats_backward='current'", "compensation='mu_nu'", 'dvar_stride=2',
                 'per_call_windows=False'):
        assert part in text, (part, text)
