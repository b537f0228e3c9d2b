"""The float64 brute-force oracle of the compensated backward: one CBN layer whose
whole forward (the paper's window) autograd differentiates end to end.

It keeps every past conv input and weight. Each past step's entry is rebuilt
as a differentiable function of the *current* conv weight and bias: its
statistics and their derivatives at the old weights by autograd, then the
first-order step (on (mu, nu) or on the variance), the variance rule, pooling
with this batch's statistics, normalisation; autograd then gives the gradient
of that whole function. Nothing is shared with the plugin's implementation.
Earlier calls of the same step (gradient accumulation) are entries taken with
the current weights: recomputed through the current conv, their inputs fixed.

Used by ``test_exact_backward.py`` and ``test_multi_call.py``.
"""
import torch
import torch.nn.functional as F


def moments(x):
    return x.mean(dim=(0, 2, 3)), (x * x).mean(dim=(0, 2, 3))


class ExactOracle:
    """One CBN layer, brute force: the paper's window, differentiated end to end."""

    def __init__(self, conv, gamma, beta, window_size, rho, rule, compensation, eps=1e-5,
                 momentum=0.1, accumulation='merge'):
        self.conv, self.gamma, self.beta = conv, gamma, beta
        self.k, self.rho, self.rule, self.form = window_size, rho, rule, compensation
        self.eps, self.momentum = eps, momentum
        self.accumulation = accumulation  # 'own': a call pools no earlier call of its step
        self.history = []  # per completed step: (inputs of its calls, weight, bias)
        self.calls = []    # this step's conv inputs so far
        self.running_mean = torch.zeros(gamma.shape, dtype=torch.float64, device=gamma.device)
        self.running_var = torch.ones(gamma.shape, dtype=torch.float64, device=gamma.device)

    def conv_with(self, inp, weight, bias):
        c = self.conv
        return F.conv2d(inp, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def past_entry(self, inputs, old_w, old_b):
        """(mu, var) of an old step as a first-order function of the current weights."""
        w0 = old_w.detach().clone().requires_grad_(True)
        b0 = None if old_b is None else old_b.detach().clone().requires_grad_(True)
        x = torch.cat([self.conv_with(i, w0, b0) for i in inputs])
        mu, nu = moments(x)
        var = nu - mu * mu
        params = [w0] + ([b0] if b0 is not None else [])
        # Channel j depends on row j only: the gradient of the sum is per channel.
        d_mu = torch.autograd.grad(mu.sum(), params, retain_graph=True)
        d_nu = torch.autograd.grad(nu.sum(), params, retain_graph=True)
        d_var = torch.autograd.grad(var.sum(), params)
        dw = (self.conv.weight - old_w.detach()).flatten(1)
        db = None if old_b is None else self.conv.bias - old_b.detach()

        def step(grads):
            shift = (grads[0].flatten(1) * dw).sum(1)
            return shift if db is None else shift + grads[1] * db

        mu_c = mu.detach() + self.rho * step(d_mu)
        if self.form == 'mu_nu':
            var_c = nu.detach() + self.rho * step(d_nu) - mu_c * mu_c
        else:
            var_c = var.detach() + self.rho * step(d_var)
        return mu_c, var_c

    def __call__(self, inp):
        conv = self.conv
        x = conv(inp)
        # Earlier calls of this step: the current weights, inputs fixed.
        earlier = [self.conv_with(i, conv.weight, conv.bias) for i in self.calls
                   if self.accumulation == 'merge']
        if not self.calls:  # the weights this step's statistics were taken with
            self.weights = (conv.weight.detach().clone(),
                            None if conv.bias is None else conv.bias.detach().clone())
        self.calls.append(inp.detach().clone())
        mu, nu = moments(torch.cat(earlier + [x]))
        mus, vars_, keep = [mu], [nu - mu * mu], [torch.ones_like(mu, dtype=torch.bool)]
        for inputs, old_w, old_b in (self.history[-(self.k - 1):][::-1] if self.k > 1 else []):
            mu_c, var_c = self.past_entry(inputs, old_w, old_b)
            negative = var_c < 0
            if self.rule == 'clamp':
                var_c = torch.clamp(var_c, min=0)
                keep.append(torch.ones_like(negative))
            else:
                keep.append(~negative)
            mus.append(mu_c)
            vars_.append(var_c)
        keep = torch.stack(keep).to(mu.dtype)
        n = keep.sum(0)
        mus, vars_ = torch.stack(mus), torch.stack(vars_)
        mu_bar = (mus * keep).sum(0) / n
        var_bar = ((vars_ + (mus - mu_bar) ** 2) * keep).sum(0) / n
        m = x.numel() // x.shape[1]
        with torch.no_grad():  # running statistics from the window
            total = n * m
            self.running_mean.lerp_(mu_bar, self.momentum)
            self.running_var.lerp_(var_bar * total / (total - 1), self.momentum)
        shape = (1, -1, 1, 1)
        return ((x - mu_bar.view(shape)) / torch.sqrt(var_bar.view(shape) + self.eps)
                * self.gamma.view(shape) + self.beta.view(shape))

    def step(self):
        self.history.append((self.calls, *self.weights))
        self.calls = []
