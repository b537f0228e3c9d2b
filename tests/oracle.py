"""Brute-force CBN written from the paper's formulas, for the tests.

It keeps every past conv input and weight, recomputes the old statistics and
their derivatives with ``torch.autograd.grad`` in float64, applies the
first-order compensation in the (mu, nu) form the paper states, the chosen
negative-variance rule, and normalises. Nothing here is shared with the
plugin's implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_moments(conv_input, weight, bias, conv):
    x = F.conv2d(conv_input, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3))


def compensated_moments(old_input, old_weight, old_bias, weight, bias, conv, rho):
    """(mu, nu) of an old batch, first-order moved from the old to the current weights."""
    w = old_weight.detach().clone().requires_grad_(True)
    b = old_bias.detach().clone().requires_grad_(True) if old_bias is not None else None
    mu, nu = conv_moments(old_input.detach(), w, b, conv)
    params = [w] + ([b] if b is not None else [])
    # Channel j's statistics depend on row j only, so the gradient of the sum
    # holds every channel's own derivative.
    dmu = torch.autograd.grad(mu.sum(), params, retain_graph=True)
    dnu = torch.autograd.grad(nu.sum(), params)
    dw = (weight.detach() - old_weight.detach()).flatten(1)
    shift_mu = (dmu[0].flatten(1) * dw).sum(1)
    shift_nu = (dnu[0].flatten(1) * dw).sum(1)
    if b is not None:
        db = bias.detach() - old_bias.detach()
        shift_mu = shift_mu + dmu[1] * db
        shift_nu = shift_nu + dnu[1] * db
    return (mu + rho * shift_mu).detach(), (nu + rho * shift_nu).detach()


class OracleCBN:
    """One CBN layer's brute-force state: the history of its conv's inputs and weights."""

    def __init__(self, conv, norm_weight, norm_bias, window_size, rho, rule, eps=1e-5,
                 momentum=0.1):
        self.conv, self.gamma, self.beta = conv, norm_weight, norm_bias
        self.k, self.rho, self.rule, self.eps, self.momentum = window_size, rho, rule, eps, momentum
        self.history = []   # (conv_input, weight, bias) per completed step
        self.current = None
        self.running_mean = torch.zeros(norm_weight.shape, dtype=torch.float64,
                                        device=norm_weight.device)
        self.running_var = torch.ones(norm_weight.shape, dtype=torch.float64,
                                      device=norm_weight.device)
        self.entries_dropped = 0

    def __call__(self, conv_input):
        conv = self.conv
        x = conv(conv_input)
        self.current = (conv_input.detach().clone(), conv.weight.detach().clone(),
                        None if conv.bias is None else conv.bias.detach().clone())
        mu, nu = x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3))
        mus, nus, keep = [mu], [nu], [torch.ones_like(mu, dtype=torch.bool)]
        for old_input, old_w, old_b in self.history[-(self.k - 1):] if self.k > 1 else []:
            mu_c, nu_c = compensated_moments(old_input, old_w, old_b, conv.weight, conv.bias,
                                             conv, self.rho)
            negative = nu_c < mu_c * mu_c
            if self.rule == 'clamp':
                nu_c = torch.maximum(nu_c, mu_c * mu_c)
                keep.append(torch.ones_like(negative))
            else:
                keep.append(~negative)
                self.entries_dropped += int(negative.sum())
            mus.append(mu_c)
            nus.append(nu_c)
        keep = torch.stack(keep).to(mu.dtype)
        count = keep.sum(0)
        mu_bar = (torch.stack(mus) * keep).sum(0) / count
        nu_bar = (torch.stack(nus) * keep).sum(0) / count
        var_bar = nu_bar - mu_bar * mu_bar
        m = x.numel() // x.shape[1]
        with torch.no_grad():
            var_batch = (nu - mu * mu) * m / (m - 1)
            self.running_mean.lerp_(mu, self.momentum)
            self.running_var.lerp_(var_batch, self.momentum)
        shape = (1, -1, 1, 1)
        return ((x - mu_bar.view(shape)) / torch.sqrt(var_bar.view(shape) + self.eps)
                * self.gamma.view(shape) + self.beta.view(shape))

    def step(self):
        self.history.append(self.current)


def sgd_in_lockstep(params, ref_params, lr, rtol, atol):
    """Check two models' gradients agree, then take the same plain SGD step on both."""
    with torch.no_grad():
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol)
            p -= lr * p.grad
            q -= lr * q.grad
            p.grad = q.grad = None
