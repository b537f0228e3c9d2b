"""Window of 1 (and any window before the first step, or during burn-in) is nn.BatchNorm2d."""
import copy

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import CBN


def make_pair(momentum, cbn_kwargs, bias=False):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8, momentum=momentum),
                        nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=momentum))
    model = copy.deepcopy(ref)
    model[1] = CBN(8, momentum=momentum, **cbn_kwargs)
    model[4] = CBN(4, momentum=momentum, **cbn_kwargs)
    model.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():  # non-trivial affine parameters, the same in both
        for a, b in ((ref[1], model[1]), (ref[4], model[4])):
            a.weight.uniform_(0.5, 1.5)
            a.bias.uniform_(-0.5, 0.5)
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
    return ref.double(), model.double()


def train_side_by_side(ref, model, steps, lr=0.1, before_step=None):
    cbn_plugin.bind(model, logger=None)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64) * 3 + 2
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ref(xa), model(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
        w = torch.randn(ya.shape, generator=gen, dtype=torch.float64)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-11, atol=1e-12)
        for (na, pa), (nb, pb) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-11, atol=1e-12, msg=na)
        for name, buf in ref.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], buf, rtol=1e-12, atol=1e-12,
                                       msg=name)
        with torch.no_grad():
            for pa, pb in zip(ref.parameters(), model.parameters()):
                pa -= lr * pa.grad
                pb -= lr * pb.grad
                pa.grad = pb.grad = None
        if before_step is not None and i == steps - 1:
            return
        cbn_plugin.step(model)
    ref.eval(), model.eval()
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('rho', [1.0, 0.0])
def test_window_of_one_is_batchnorm(momentum, rho):
    ref, model = make_pair(momentum, dict(window_size=1, rho=rho))
    train_side_by_side(ref, model, steps=6)
    assert model[1].window_numel() == 0


@pytest.mark.parametrize('momentum', [0.1, None])
def test_any_window_before_first_step_is_batchnorm(momentum):
    # Several forwards before the first step (pooling mode would merge them;
    # with one forward there is nothing to merge): the first call is exact BN.
    ref, model = make_pair(momentum, dict(window_size=4))
    train_side_by_side(ref, model, steps=1, before_step=True)


def test_burn_in_is_batchnorm_and_window_then_differs():
    ref, model = make_pair(0.1, dict(window_size=3))
    for layer in (model[1], model[4]):
        layer.burn_in_steps = 5
    train_side_by_side(ref, model, steps=5)
    # Recording started k-1 = 2 steps before the end of burn-in: the window is
    # full when burn-in ends, and the next training forward differs from BN.
    assert [int(model[1].window_filled[0]), model[1].steps_done] == [2, 5]
    ref.train(), model.train()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert not torch.allclose(model(x), ref(x), atol=1e-6)
    assert model[1].diagnostics['window'] == 3


def test_conv_bias_window_of_one_is_batchnorm():
    ref, model = make_pair(0.1, dict(window_size=1), bias=True)
    train_side_by_side(ref, model, steps=3)
