"""The two-pass step (``accumulation='two_pass'``, ``cbn_plugin.statistics_pass``).

The oracle: when the CBN layer's input does not depend on another norm (a conv fed by the
data), the statistics pass sees exactly what the training pass sees, so A micro-batches
of a two-pass step must train exactly like one call on the whole step's images: the same
outputs, the same gradients of the conv and the affine parameters, the same running
statistics and the same window, at every step (float64). The conv weight's gradient is
the same only under the compensated backward: there the other micro-batches' statistics
pass theirs through their stored derivatives; under the other backwards (and without
compensation) a micro-batch's gradient reaches the statistics through its own share only,
as under ``'merge'``. ``window_size=1`` is BN over the whole step (``nn.BatchNorm2d`` on the
concatenated micro-batches, in the forward).
"""
import copy

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import CBN


class ConvNorm(nn.Module):
    def __init__(self, **cbn):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.bn = CBN(5, **cbn)

    def forward(self, x):
        return self.bn(self.conv(x))


def _pair(window_size, **cbn):
    torch.manual_seed(0)
    whole = ConvNorm(window_size=window_size, **cbn).double()
    with torch.no_grad():
        whole.bn.weight.add_(0.3 * torch.randn(5, dtype=torch.float64))
        whole.bn.bias.add_(0.3 * torch.randn(5, dtype=torch.float64))
    split = copy.deepcopy(whole)
    split.bn.accumulation = 'two_pass'
    for model in (whole, split):
        cbn_plugin.bind(model, logger=None)
    return whole, split


def _train(whole, split, steps=7, micro=4, per_micro=2, lr=0.3, conv_grad=True):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(micro * per_micro, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
        target = torch.randn(micro * per_micro, 5, 5, 5, generator=gen, dtype=torch.float64)
        out = whole(x)
        (out * target).sum().backward()
        pieces = list(zip(x.split(per_micro), target.split(per_micro)))
        with cbn_plugin.statistics_pass(split):
            for xi, _ in pieces:
                split(xi)
        outs = []
        for xi, ti in pieces:
            oi = split(xi)
            (oi * ti).sum().backward()
            outs.append(oi.detach())
        torch.testing.assert_close(torch.cat(outs), out.detach(), rtol=1e-9, atol=1e-9)
        for (name, a), b in zip(split.named_parameters(), whole.parameters()):
            if conv_grad or not name.startswith('conv'):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-9, msg=name)
        with torch.no_grad():
            for model in (whole, split):
                for p in model.parameters():
                    p.sub_(lr * p.grad)
                    p.grad = None
            if not conv_grad:  # the same weights again, to compare the next step's forward
                whole.conv.weight.copy_(split.conv.weight)
        for model in (whole, split):
            cbn_plugin.step(model)
        for name in ('running_mean', 'running_var', 'window_mean', 'window_var',
                     'window_grad_mean', 'window_grad_var', 'window_valid'):
            a, b = getattr(split.bn, name), getattr(whole.bn, name, None)
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize('cbn', [dict(), dict(running_stats='batch'), dict(compensation='mu_nu'),
                                 dict(variance_rule='exclude'), dict(rho=0.0)])
def test_two_pass_step_equals_one_call_on_the_whole_step(cbn):
    _train(*_pair(3, **cbn))


@pytest.mark.parametrize('cbn', [dict(mode='paper'), dict(stats_backward='pooled')])
def test_two_pass_step_forward_equals_one_call_in_every_mode(cbn):
    _train(*_pair(3, **cbn), conv_grad=False)


def test_burn_in_is_bn_per_micro_batch():
    """Before the window records (burn-in), a two-pass step is plain BN on each micro-batch,
    as under 'merge', and its statistics pass keeps nothing."""
    _, split = _pair(3)
    split.bn.set_schedule(burn_in_steps=5)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with cbn_plugin.statistics_pass(split):
        split(x[:2])
    assert split.bn.window.pass_calls == []
    bn = nn.BatchNorm2d(5).double()
    bn.load_state_dict(split.bn.state_dict())
    torch.testing.assert_close(split(x[:2]), bn(split.conv(x[:2])))
    torch.testing.assert_close(split.bn.running_mean, bn.running_mean)


def test_window_one_is_bn_over_the_whole_step():
    """window_size=1 with two_pass: each micro-batch normalised with the step's statistics
    (BN on the concatenated micro-batches), the running statistics updated once."""
    whole, split = _pair(1)
    bn = nn.BatchNorm2d(5).double()
    bn.load_state_dict(whole.bn.state_dict())
    whole.bn = bn
    _train(whole, split, steps=4)


def test_the_oracle_fails_without_the_statistics_pass_calls():
    """The same comparison with 'merge' (the early micro-batches see only the step so far)
    must fail: the oracle tells the two apart."""
    whole, split = _pair(3)
    split.bn.accumulation = 'merge'
    real = cbn_plugin.statistics_pass
    try:
        cbn_plugin.statistics_pass = lambda model: torch.no_grad()  # noqa: E731
        with pytest.raises(AssertionError):
            _train(whole, split)
    finally:
        cbn_plugin.statistics_pass = real


def test_a_training_pass_longer_than_the_statistics_pass_is_refused():
    _, split = _pair(3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with cbn_plugin.statistics_pass(split):
        split(x[:2])
    split(x[:2])
    with pytest.raises(RuntimeError, match=r"at call 2 of this step's training pass, but its "
                                           r'statistics pass made 1'):
        split(x[2:])


def test_a_training_pass_shorter_than_the_statistics_pass_is_refused_at_the_step():
    _, split = _pair(3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with cbn_plugin.statistics_pass(split):
        split(x[:2])
        split(x[2:])
    split(x[:2]).sum().backward()
    with pytest.raises(RuntimeError, match='statistics pass made 2 calls and the training '
                                           'pass 1'):
        cbn_plugin.step(split)


def test_two_pass_without_a_statistics_pass_is_refused():
    _, split = _pair(3)
    with pytest.raises(RuntimeError, match=r'cbn_plugin.statistics_pass\(model\)'):
        split(torch.randn(2, 3, 5, 5, dtype=torch.float64))


def test_statistics_pass_refuses_other_accumulation_modes():
    whole, _ = _pair(3)
    with pytest.raises(ValueError, match=r"accumulation='two_pass'; these have another: "
                                         r"bn \('merge'\)"):
        with cbn_plugin.statistics_pass(whole):
            pass
    whole(torch.randn(2, 3, 5, 5, dtype=torch.float64))  # a training call: recorded
    assert list(whole.bn.window.calls) == [0]


def test_statistics_pass_changes_nothing_but_the_step_s_calls():
    whole, split = _pair(3)
    _train(whole, split, steps=2)  # a window in place
    before = {k: v.clone() for k, v in split.state_dict().items()}
    with cbn_plugin.statistics_pass(split):
        split(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    after = split.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_two_pass_with_per_call_windows_is_refused():
    with pytest.raises(ValueError, match="accumulation='two_pass' pools the calls of a step"):
        CBN(4, accumulation='two_pass', per_call_windows=True)


def test_sync_cbn_refuses_two_pass():
    with pytest.raises(ValueError, match="SyncCBN does not support accumulation='two_pass'"):
        cbn_plugin.SyncCBN(4, accumulation='two_pass')


def test_bind_needs_a_conv_for_the_exact_two_pass_gradient():
    """Without compensation (window_size=1 here) a two-pass layer still takes the other
    micro-batches' derivatives: bind refuses a layer with no conv before it, by name."""
    model = nn.Sequential(nn.ReLU(), CBN(3, window_size=1, accumulation='two_pass'))
    with pytest.raises(ValueError, match=r"CBN '1' .* the exact gradient of "
                                         r"accumulation='two_pass' needs one.*"
                                         r"stats_backward='current'"):
        cbn_plugin.bind(model, logger=None)
    model[1].stats_backward = 'current'  # its own share only: no conv needed
    assert cbn_plugin.bind(model, logger=None) == [('1', None)]


def test_statistics_pass_normalises_each_call_with_the_step_so_far():
    """In the statistics pass call i is normalised as 'merge' would normalise it: with the
    statistics of calls 0..i (the first step: no window yet), which is BN over them."""
    _, split = _pair(3)
    xs = torch.randn(6, 3, 5, 5, dtype=torch.float64).split(2)
    with cbn_plugin.statistics_pass(split):
        outs = [split(x) for x in xs]
    bn = split.bn
    for i, out in enumerate(outs):
        y = split.conv(torch.cat(xs[:i + 1])).detach()
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
        expected = torch.nn.functional.batch_norm(split.conv(xs[i]).detach(), mean, var,
                                                  bn.weight, bn.bias, False, 0.0, bn.eps)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_a_repeated_training_call_pools_the_same_other_calls():
    """The training pass's calls take the pass's other calls from merges kept as the pass
    goes (O(A) per step); a call repeated as the step's first (``discard_step``, as a
    gradient check does) must get the same: all calls but its own, whatever came before."""
    _, split = _pair(3)
    xs = torch.randn(8, 3, 5, 5, dtype=torch.float64).split(2)
    with cbn_plugin.statistics_pass(split):
        for x in xs:
            split(x)
    first = [split(x).detach() for x in xs[:3]]
    split.bn.discard_step()
    again = [split(x).detach() for x in (xs[0], xs[1])]
    for got, expected in zip(again, first):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # call i is normalised with the whole step: BN over the 8 images of all four calls
    y = split.conv(torch.cat(xs)).detach()
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    bn = split.bn
    for x, out in zip(xs, first):
        expected = torch.nn.functional.batch_norm(split.conv(x).detach(), mean, var,
                                                  bn.weight, bn.bias, False, 0.0, bn.eps)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
