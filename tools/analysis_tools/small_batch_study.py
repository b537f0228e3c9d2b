"""Small-batch study: BN, GN, naive CBN and CBN trained from scratch at batch 32 down to 1.

Every norm layer of a small CNN (and of a small ResNet, stem included) is swapped for the
norm under test; each run sees the same number of training samples, with the learning rate
scaled linearly with the batch (Goyal et al.) so that the schedule per sample is the same.
CBN's window is ``k = 32 / batch`` steps, so the window always spans 32 samples, the largest
batch. CBN runs use the layer's own options, each backward (``stats_backward`` 'current',
'pooled', 'compensated') with each compensation ('mu_nu', 'var'); the running statistics of
both sources ('batch', 'window') are kept side by side, so one trained network is evaluated
both ways. A row whose options are the layer's defaults is built as ``CBN(c, window_size=k)``
and nothing else, and the row ``CBN() (k=4)`` as ``CBN(c)``: the layer users get.

Alongside the accuracy, the script measures *why*: at chosen steps it pushes the raw input
batches of the window's old steps through the current whole network (every norm frozen to
the statistics it used at this step, so the function is exactly the one that ran) and
compares, per layer, the current batch alone, naive pooling and both compensations against
the true window statistics. It also compares the conv-weight gradient of each of the layer's
backwards (computed by the layer itself, on a copy of the network loaded from the
state_dict with ``stats_backward`` set) and of BN at the batch alone with large-batch BN's.

    .venv/bin/python tools/analysis_tools/small_batch_study.py   # full study -> docs/small_batch*
    .venv/bin/python tools/analysis_tools/small_batch_study.py --tiny --out-dir /tmp/sb  # seconds
    .venv/bin/python tools/analysis_tools/small_batch_study.py \
        --from-json docs/small_batch.json                          # re-render

The full run writes ``docs/small_batch.json`` (every run, every measurement),
``docs/small_batch.png`` (accuracy vs batch), ``docs/small_batch_errors.png`` (statistics
error vs window and learning rate) and the generated block of ``docs/small_batch.md``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import cbn_plugin  # noqa: E402
from cbn_plugin import functional as CF  # noqa: E402
from cbn_plugin.layer import MODES  # noqa: E402
from cbn_plugin.layer import CrossIterationBatchNorm2d as CBN  # noqa: E402

DOC_BEGIN = ('<!-- small-batch:begin (written by tools/analysis_tools/small_batch_study.py; '
             'do not edit) -->')
DOC_END = '<!-- small-batch:end -->'
LARGEST_BATCH = 32
EPS = 1e-5

# ----------------------------------------------------------------------------- data

_DATA: dict = {}


def load_task(task: str):
    """``(x_train, y_train, x_test, y_test)``: N x 1 x H x W float32, int64 labels.

    scikit-learn's 1,797 real 8x8 handwritten digits, one fixed stratified split
    (1,078 train / 719 test). ``'raw'``: the 8x8 images. ``'lowres'``: the same images
    at a quarter of the pixels (2x2 average pooling to 4x4), the harder task of the study.
    ``'shift5'`` (the second setting): each digit at a random offset (0-2 pixels down and
    right, fixed per image) on a 10x10 canvas, then 2x2 average pooling to 5x5: the
    pooling grid cuts every digit differently. All are standardised with the training
    set's pixel mean and std.
    """
    if task in _DATA:
        return _DATA[task]
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(labels)), test_size=0.4,
                                      stratify=labels, random_state=0)
    if task == 'raw':
        canvas = images
    elif task == 'lowres':
        canvas = images.reshape(-1, 4, 2, 4, 2).mean((2, 4))
    elif task == 'shift5':
        offsets = np.random.default_rng(0).integers(0, 3, size=(len(images), 2))
        big = np.zeros((len(images), 10, 10), np.float32)
        for i, (dy, dx) in enumerate(offsets):
            big[i, dy:dy + 8, dx:dx + 8] = images[i]
        canvas = big.reshape(-1, 5, 2, 5, 2).mean((2, 4))
    else:
        raise ValueError(f'unknown task {task!r}')
    x = torch.from_numpy(np.ascontiguousarray(canvas)).unsqueeze(1)
    x = (x - x[idx_tr].mean()) / x[idx_tr].std()
    y = torch.from_numpy(labels)
    _DATA[task] = (x[idx_tr], y[idx_tr], x[idx_te], y[idx_te])
    return _DATA[task]


# ----------------------------------------------------------------------------- models

def _layer_defaults() -> dict:
    """The CBN constructor's defaults, with its ``mode`` preset resolved."""
    params = inspect.signature(CBN.__init__).parameters
    out = {k: params[k].default for k in ('window_size', 'rho', 'variance_rule')}
    out.update(MODES[params['mode'].default])
    return out


LAYER_DEFAULTS = _layer_defaults()
# spec key -> CBN argument
SPEC_ARGS = (('rho', 'rho'), ('backward', 'stats_backward'), ('compensation', 'compensation'),
             ('running_stats', 'running_stats'), ('variance_rule', 'variance_rule'))


def cbn_kwargs(spec: dict) -> dict:
    """The arguments a CBN row passes: only those that differ from the layer's defaults.

    A row whose options are the defaults is built as ``CBN(c, window_size=k)`` (the layer
    users get with ``norm_cfg=dict(type='CBN', window_size=k)``); ``plain`` rows as
    ``CBN(c)`` (``dict(type='CBN')``).
    """
    if spec.get('plain'):
        return {}
    kwargs = {'window_size': spec['window']}
    for key, arg in SPEC_ARGS:
        if key in spec and spec[key] != LAYER_DEFAULTS[arg]:
            kwargs[arg] = spec[key]
    return kwargs


def make_norm(spec: dict, channels: int) -> nn.Module:
    kind = spec['kind']
    if kind == 'bn':
        return nn.BatchNorm2d(channels)
    if kind == 'gn':
        return nn.GroupNorm(min(8, channels), channels)
    if kind == 'cbn':
        return CBN(channels, **cbn_kwargs(spec))
    raise ValueError(f'unknown norm {kind!r}')


class SmallCNN(nn.Module):
    """conv3x3-norm-ReLU blocks (bias-free convs), global average pool, linear."""

    def __init__(self, spec, widths=(16, 32, 64), strides=(1, 2, 1)):
        super().__init__()
        layers, cin = [], 1
        for w, s in zip(widths, strides):
            layers += [nn.Conv2d(cin, w, 3, s, 1, bias=False), make_norm(spec, w),
                       nn.ReLU(inplace=True)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, spec, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = make_norm(spec, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = make_norm(spec, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            make_norm(spec, cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class SmallResNet(nn.Module):
    """ResNet-style: stem conv+norm, then one basic block per stage; EVERY norm is swapped.

    Widths 16, 32, 64, strides 1, 2, 1 (on 4x4 inputs: maps 4x4, 4x4, 2x2, 2x2); 9 norm
    layers, the first one right after the stem conv, three in projection shortcuts.
    """

    def __init__(self, spec, widths=(16, 32, 64), strides=(1, 2, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = make_norm(spec, widths[0])
        blocks, cin = [], widths[0]
        for w, s in zip(widths, strides):
            blocks.append(BasicBlock(spec, cin, w, s))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layers(x).mean((2, 3)))


class OneConv(nn.Module):
    """A single conv + norm (the analysis oracle: CBN's truncation is then exact)."""

    def __init__(self, spec, width=8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                      make_norm(spec, width), nn.ReLU(inplace=True))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


ARCHS = {'cnn': SmallCNN, 'resnet': SmallResNet, 'oneconv': OneConv}


# ----------------------------------------------------------------------------- probe

def _rms(t):
    return float(t.pow(2).mean().sqrt())


def _mean_err(mean, ref_mean, ref_var):
    """RMS over channels of the mean error in units of the reference std."""
    return _rms((mean - ref_mean) / (ref_var + EPS).sqrt())


def _std_err(var, ref_var):
    """RMS over channels of log(sigma / sigma_ref) (about the relative error of the std)."""
    return _rms(0.5 * torch.log((var.clamp_min(0) + EPS) / (ref_var + EPS)))


def ring_indices(layer, ages: int, position: int = 0) -> torch.Tensor:
    """Ring slots of the ``ages`` newest past steps, newest first (the layer's own order).

    From the window's buffers (``window_next``: the slot the next step is written to), so
    row ``j`` of ``layer.window_mean[position][idx]`` is the step ``j + 1`` steps back,
    the same row as ``layer.past_entries(position)``'s.
    """
    k1 = layer.window_size - 1
    newest = int(layer.window_next[position]) - 1
    return torch.tensor([(newest - a) % k1 for a in range(ages)], dtype=torch.long)


class NormProbe:
    """Hooks on every CBN layer of a model; it never changes what the layer computes.

    In training forwards it records this step's batch statistics and the statistics the
    layer normalised with (``pool_window`` of the batch and ``layer.past_entries()``,
    exactly the layer's computation), and keeps two sets of running statistics with the
    layer's own update rule: from the batch (``running_stats='batch'``) and from the window
    (``running_stats='window'``), so one training run can be evaluated both ways.
    In ``'probe'`` mode (eval, no grad) every CBN's output is replaced by BN with the
    statistics it used at the last training forward, so a forward is the function of the
    network as it ran at that step, and each layer's input statistics are recorded. In
    ``'grad'`` mode (eval) the output is replaced by BN over the batch it gets (the
    reference gradients of ``gradients``: BN at this batch, large-batch BN).
    """

    def __init__(self, model: nn.Module):
        self.layers = cbn_plugin.cbn_layers(model)
        self.mode = 'train'
        self.cur, self.used, self.recorded = {}, {}, {}
        self.ema = {}
        self.handles = []
        for name, layer in self.layers:
            self.ema[name] = {k: (layer.running_mean.clone(), layer.running_var.clone())
                              for k in ('batch', 'window')}
            self.handles.append(layer.register_forward_pre_hook(
                lambda mod, args, name=name: self._pre(name, mod, args)))
            self.handles.append(layer.register_forward_hook(
                lambda mod, args, out, name=name: self._post(name, mod, args, out)))

    def remove(self):
        for h in self.handles:
            h.remove()

    def _pre(self, name, layer, args):
        if self.mode == 'train' and layer.training and torch.is_grad_enabled():
            self.cur[name] = CF.batch_stats(args[0].detach())
        elif self.mode == 'probe':
            self.recorded[name] = CF.batch_stats(args[0])

    def _post(self, name, layer, args, out):
        if self.mode == 'probe':
            mean, var, _ = self.used[name]
            return F.batch_norm(args[0], mean, var, layer.weight, layer.bias, False, 0.0,
                                layer.eps)
        if self.mode == 'grad':
            # BN over the batch this layer gets: this batch alone, or the union (ideal)
            return F.batch_norm(args[0], None, None, layer.weight, layer.bias, True, 0.0,
                                layer.eps)
        if not (layer.training and torch.is_grad_enabled()):
            return None
        mean_c, var_c = self.cur[name]
        past = layer.past_entries(0)
        count = args[0].numel() // args[0].shape[1]
        if past is not None and past.mean.shape[0] > 0:
            mean, var, pooled = CF.pool_window(mean_c, var_c, *past)
            mean, var, pooled = mean.detach(), var.detach(), pooled.detach()
            total = pooled * count
            window = (mean, var * total / (total - 1).clamp_min(1))
            self.used[name] = (mean, var, True)
        else:
            window = None
            self.used[name] = (mean_c, var_c, False)
        batch = (mean_c, var_c * (count / max(count - 1, 1)))
        m = layer.momentum
        for key, new in (('batch', batch), ('window', window or batch)):
            old = self.ema[name][key]
            self.ema[name][key] = tuple(torch.lerp(o, n.to(o.dtype), m) for o, n in zip(old, new))
        return None

    def gradients(self, model, old_batches, xb, yb):
        """Reference conv-weight gradients of this batch's loss: ``{'small', 'ideal'}``.

        'small': BN over this batch alone (BN at this batch size); 'ideal': the gradient of
        this batch's loss through BN over the union of this batch and the window's old
        batches, all under the current weights (large-batch BN, what CBN approximates).
        The model runs in eval mode, so no layer state changes.
        """
        convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        was_training = model.training
        model.eval()
        self.mode = 'grad'
        out = {}
        try:
            for mode in ('small', 'ideal'):
                x = torch.cat([xb] + list(old_batches)) if mode == 'ideal' else xb
                loss = F.cross_entropy(model(x)[:len(xb)], yb)
                out[mode] = torch.autograd.grad(loss, convs)
        finally:
            self.mode = 'train'
            model.train(was_training)
        return out

    def swap_running(self, key: str):
        """Put the ``key`` running statistics into the layers; returns a restore function."""
        saved = {name: (layer.running_mean.clone(), layer.running_var.clone())
                 for name, layer in self.layers}
        for name, layer in self.layers:
            layer.running_mean.copy_(self.ema[name][key][0])
            layer.running_var.copy_(self.ema[name][key][1])

        def restore():
            for name, layer in self.layers:
                layer.running_mean.copy_(saved[name][0])
                layer.running_var.copy_(saved[name][1])
        return restore

    @torch.no_grad()
    def replay(self, model, batches):
        """Per batch, every CBN's input statistics under the network of the last step."""
        was_training = model.training
        model.eval()
        self.mode = 'probe'
        out = []
        try:
            for xb in batches:
                self.recorded = {}
                model(xb)
                out.append(dict(self.recorded))
        finally:
            self.mode = 'train'
            model.train(was_training)
        return out

    def analyse(self, model, old_batches, population):
        """The statistics-error analysis of the current step, per CBN layer.

        ``old_batches``: the raw inputs of the previous steps, newest first (step t-1
        first), so entry ``j`` matches ``layer.past_entries()``'s row ``j``. ``population``:
        a fixed set of training inputs. Call after the training forward and before the
        optimizer step (the conv weights are the ones the compensation used; the layer
        writes this step's record into the window only at ``step()``).
        Returns ``{layer: metrics}`` (layers whose window is not in use are left out).
        Both compensations are computed from the window's stored statistics and
        derivatives, whichever the layer uses; ``check_mean``/``check_var`` compare the
        layer's own one with its ``past_entries()``.
        """
        ages = {}
        for name, layer in self.layers:
            past = layer.past_entries(0)
            if past is not None and past.mean.shape[0] > 0:
                ages[name] = past.mean.shape[0]
        if not ages:
            return {}
        j_max = max(ages.values())
        truth = self.replay(model, list(old_batches)[:j_max] + [population])
        pop = truth.pop()
        result = {}
        for name, layer in self.layers:
            if name not in ages:
                continue
            j = ages[name]
            mean_c, var_c = self.cur[name]
            mean_p, var_p, valid = layer.past_entries(0)
            idx = ring_indices(layer, j)
            mean_o, var_o = layer.window_mean[0][idx], layer.window_var[0][idx]
            mean_t = torch.stack([truth[a][name][0] for a in range(j)])
            var_t = torch.stack([truth[a][name][1] for a in range(j)])
            ones = torch.ones_like(valid)
            win = CF.pool_window(mean_c, var_c, mean_t, var_t, ones)
            est = {'current': (mean_c, var_c),
                   'naive': CF.pool_window(mean_c, var_c, mean_o, var_o, ones)[:2],
                   'cbn': self.used[name][:2]}
            m = {'ages': j}
            if layer.compensates:
                conv = layer.bound_conv
                grads = (layer.window_grad_mean[0][idx], layer.window_grad_var[0][idx])
                with torch.no_grad():
                    mean_k, var_k = CF.compensate(mean_o, var_o, *grads, conv.weight,
                                                  conv.bias, layer.rho, 'mu_nu')
                    _, var_v = CF.compensate(mean_o, var_o, *grads, conv.weight, conv.bias,
                                             layer.rho, 'var')
                d_mu2 = var_v - var_k  # rho^2 d_mu^2, the term the var form drops
                est['munu'] = CF.pool_window(mean_c, var_c, mean_k, var_k.clamp_min(0),
                                             ones)[:2]
                est['varform'] = CF.pool_window(mean_c, var_c, mean_k, var_v.clamp_min(0),
                                                ones)[:2]
                own = var_v if layer.compensation == 'var' else var_k
                scale = var_t.sum()
                under = (var_t - var_k).sum()
                m.update(
                    entry_mean_err_naive=_rms((mean_o - mean_t) / (var_t + EPS).sqrt()),
                    entry_mean_err_comp=_rms((mean_k - mean_t) / (var_t + EPS).sqrt()),
                    entry_var_bias_naive=float((var_o - var_t).sum() / scale),
                    entry_var_bias_comp=float((var_k - var_t).sum() / scale),
                    entry_var_bias_varform=float((var_v - var_t).sum() / scale),
                    entry_var_abs_naive=float((var_o - var_t).abs().sum() / scale),
                    entry_var_abs_comp=float((var_k - var_t).abs().sum() / scale),
                    entry_var_abs_varform=float((var_v - var_t).abs().sum() / scale),
                    entry_dmu2=float(d_mu2.sum() / scale),
                    dmu2_share_of_under=float(d_mu2.sum() / under) if under > 0 else float('nan'),
                    neg_frac_comp=float((var_k < 0).float().mean()),
                    neg_frac_varform=float((var_v < 0).float().mean()),
                    neg_fixed_by_varform=float(((var_k < 0) & (var_v >= 0)).sum()
                                               / (var_k < 0).sum().clamp_min(1)),
                    check_mean=float((mean_k - mean_p).abs().max()),
                    check_var=float((own.clamp_min(0) - var_p).abs().max()),
                )
            for key, (mean, var) in est.items():
                m[f'win_mean_err_{key}'] = _mean_err(mean, win[0], win[1])
                m[f'win_std_err_{key}'] = _std_err(var, win[1])
                m[f'pop_mean_err_{key}'] = _mean_err(mean, *pop[name])
                m[f'pop_std_err_{key}'] = _std_err(var, pop[name][1])
            m['pop_mean_err_truth'] = _mean_err(win[0], *pop[name])
            m['pop_std_err_truth'] = _std_err(win[1], pop[name][1])
            result[name] = m
        return result


@torch.no_grad()
def running_stats_error(model, population) -> dict:
    """How far each BN/CBN layer's running statistics are from what inference sees.

    Pushes ``population`` through the model in eval mode (every layer normalising with
    its running statistics, i.e. the test-time network) and compares each layer's running
    mean / std with the statistics of its actual input there. Mean over the layers of the
    RMS-over-channels mean error (units of the input std) and |log std ratio|.
    """
    from torch.nn.modules.batchnorm import _BatchNorm
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, _BatchNorm) and mod.track_running_stats:
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: seen.__setitem__(name, (m, CF.batch_stats(a[0])))))
    was = model.training
    model.eval()
    try:
        model(population)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    mean_errs, std_errs = [], []
    for mod, (mean, var) in seen.values():
        mean_errs.append(_mean_err(mod.running_mean.float(), mean, var))
        std_errs.append(_std_err(mod.running_var.float(), var))
    return {'mean': float(np.mean(mean_errs)), 'std': float(np.mean(std_errs))}


def radial_stats(model) -> dict:
    """Per conv: mean cos(grad W_j, W_j) over output channels, and mean ||W_j||.

    With BN right after a bias-free conv the loss is invariant to the scale of each W_j,
    so the gradient is orthogonal to W_j (cos 0). CBN's 'current' backward is the exact
    gradient of a forward whose past statistics are constants: not scale-invariant.
    """
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.weight.grad is not None:
            w, g = mod.weight.detach().flatten(1), mod.weight.grad.flatten(1)
            cos = (w * g).sum(1) / (w.norm(dim=1) * g.norm(dim=1)).clamp_min(1e-30)
            out[name] = (float(cos.mean()), float(w.norm(dim=1).mean()))
    return out


FIDELITY = ('current', 'pooled', 'small', 'compensated')


def _cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def layer_gradients(model, build, xb, yb, backwards):
    """Conv-weight gradients of this batch's loss under each of the layer's backwards.

    Each is computed by the layer itself: a copy of the network built by ``build``, loaded
    from ``model``'s state_dict (weights, running statistics and the whole window, as a
    resumed run), bound, every CBN's ``stats_backward`` set, one training forward and
    backward. Call between the training backward and ``cbn_plugin.step``: the copy's
    step is then the same step. Returns ``({backward: [grad per conv]}, {backward: loss})``.
    """
    grads, losses = {}, {}
    schedule = {n: (l.burn_in_steps, l.ramp_steps) for n, l in cbn_plugin.cbn_layers(model)}
    for backward in backwards:
        twin = build()
        twin.load_state_dict(model.state_dict())
        cbn_plugin.bind(twin, logger=None)
        for n, layer in cbn_plugin.cbn_layers(twin):
            layer.burn_in_steps, layer.ramp_steps = schedule[n]
            layer.stats_backward = backward
        twin.train()
        convs = [m.weight for m in twin.modules() if isinstance(m, nn.Conv2d)]
        loss = F.cross_entropy(twin(xb), yb)
        grads[backward] = torch.autograd.grad(loss, convs)
        losses[backward] = float(loss.detach())
    return grads, losses


def gradient_fidelity(model, probe, build, old_batches, xb, yb, loss) -> dict:
    """Cosine of each backward's conv-weight gradient with the ideal (large-batch BN) one.

    Averaged over the convs. Backwards: the layer's 'current' (the paper), 'pooled' and
    'compensated' (``layer_gradients``; 'compensated' only where every CBN compensates),
    and BN at this batch alone ('small'). ``check``: the largest relative difference
    between the copy's gradient under the run's own ``stats_backward`` and the gradient the
    training backward produced (0: the copy is the layer that trained);
    ``check_forward``: the largest difference of the copies' losses from the training
    loss (every backward has the same forward).
    """
    layers = probe.layers
    backwards = ['current', 'pooled']
    if all(layer.compensates for _, layer in layers):
        backwards.append('compensated')
    grads, losses = layer_gradients(model, build, xb, yb, backwards)
    grads.update(probe.gradients(model, old_batches, xb, yb))
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    own = layers[0][1].stats_backward
    if own not in grads:  # 'compensated' on a layer that does not compensate is 'current'
        own = 'current'
    check = max(float((e - c.grad).norm() / c.grad.norm().clamp_min(1e-30))
                for e, c in zip(grads[own], convs))
    out = {f'cos_{mode}': float(np.mean([_cos(g, i) for g, i in zip(grads[mode],
                                                                     grads['ideal'])]))
           for mode in FIDELITY if mode in grads}
    out['check'] = check
    out['check_forward'] = max(abs(v - loss) for v in losses.values())
    return out


# ----------------------------------------------------------------------------- training

def evaluate(model, x, y, batch=512):
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    model.train(was)
    return correct / len(x)


def _mean_dicts(dicts):
    keys = dicts[0].keys()
    return {k: float(np.nanmean([d[k] for d in dicts])) for k in keys}


def train_run(cfg: dict) -> dict:
    """One training run; returns accuracy, loss, and the measurements.

    cfg keys: task, arch, norm (spec), batch, samples, lr, seed, and optionally
    measure (number of analysis points), wd, burn_in_samples.
    """
    torch.set_num_threads(1)
    torch.manual_seed(cfg['seed'])
    xtr, ytr, xte, yte = load_task(cfg['task'])
    build = lambda: ARCHS[cfg['arch']](cfg['norm'])  # noqa: E731
    model = build()
    batch = cfg['batch']
    steps = max(1, cfg['samples'] // batch)
    probe = None
    if cbn_plugin.cbn_layers(model):
        cbn_plugin.bind(model, logger=None)
        for _, layer in cbn_plugin.cbn_layers(model):
            layer.burn_in_steps = cfg.get('burn_in_samples', 0) // batch
        probe = NormProbe(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg['lr'], momentum=0.9,
                          weight_decay=cfg.get('wd', 5e-4))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = np.random.default_rng(cfg['seed'])
    order = np.concatenate([gen.permutation(len(xtr))
                            for _ in range(steps * batch // len(xtr) + 1)])
    pop_idx = torch.from_numpy(np.random.default_rng(1234).permutation(len(xtr))[:512])
    population = xtr[pop_idx]
    window = cfg['norm'].get('window', 1)
    history = deque(maxlen=max(1, window - 1))
    n_measure = cfg.get('measure', 0)
    # Measurement points: evenly spread once the window is full.
    first = min(steps - 1, window + 1)
    points = set(np.linspace(first, steps - 1, n_measure).round().astype(int).tolist()) \
        if n_measure else set()
    analyses, radial, grad_checks = [], [], []
    losses, status = [], 'ok'
    start = time.perf_counter()
    for s in range(steps):
        xb = xtr[torch.from_numpy(order[s * batch:(s + 1) * batch])]
        yb = ytr[torch.from_numpy(order[s * batch:(s + 1) * batch])]
        try:
            loss = F.cross_entropy(model(xb), yb)
        except (ValueError, RuntimeError) as exc:
            status = f'error at step {s}: {str(exc).splitlines()[0][:150]}'
            break
        if not torch.isfinite(loss):
            status = f'non-finite loss at step {s}'
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s in points:
            radial.append(radial_stats(model))
            if probe is not None:
                old = list(reversed(history))
                analyses.append(probe.analyse(model, old, population))
                if any(used for *_, used in probe.used.values()):
                    grad_checks.append(gradient_fidelity(model, probe, build, old, xb, yb,
                                                         float(loss.detach())))
        opt.step()
        sched.step()
        cbn_plugin.step(model)
        history.append(xb)
        losses.append(loss.item())
    train_time = time.perf_counter() - start
    acc = {'batch': float('nan'), 'window': float('nan')}
    running_err = {}
    if status == 'ok':
        if probe is None:
            acc['batch'] = acc['window'] = evaluate(model, xte, yte)
            running_err['batch'] = running_stats_error(model, population)
        else:
            for key in ('batch', 'window'):  # the same weights, each running-statistics rule
                restore = probe.swap_running(key)
                acc[key] = evaluate(model, xte, yte)
                running_err[key] = running_stats_error(model, population)
                restore()
    n_tail = max(1, len(losses) // 10)
    result = dict(cfg=cfg, acc=acc['batch'], acc_window=acc['window'],
                  final_loss=float(np.mean(losses[-n_tail:])) if losses else float('nan'),
                  status=status, steps=steps, steps_done=len(losses), time=train_time,
                  running_error=running_err)
    if probe is not None:
        # the layer's own running statistics must be the probe's copy of its rule
        first = probe.layers[0][1]
        key = first.running_stats
        result['layer'] = dict(args=cbn_kwargs(cfg['norm']), stats_backward=first.stats_backward,
                               compensation=first.compensation, running_stats=key,
                               window_size=first.window_size, rho=first.rho)
        result['ema_check'] = max(
            float((layer.running_mean - probe.ema[n][key][0]).abs().max())
            for n, layer in probe.layers) if status == 'ok' else float('nan')
        probe.remove()
    if status == 'ok' and cfg.get('precise_samples'):
        result.update(precise_accuracy(model, xtr, xte, yte, batch, cfg['precise_samples']))
    layers = sorted({n for a in analyses for n in a})
    if layers:
        result['analysis'] = {n: _mean_dicts([a[n] for a in analyses if n in a])
                              for n in layers}
        result['analysis_points'] = len(analyses)
    if grad_checks:
        result['grad_fidelity'] = _mean_dicts(grad_checks)
    if radial:
        names = list(radial[0])
        result['radial_cos'] = {n: float(np.mean([r[n][0] for r in radial])) for n in names}
        result['weight_norm'] = {n: [r[n][1] for r in radial] for n in names}
    return result


def precise_accuracy(model, xtr, xte, yte, batch: int, samples: int) -> dict:
    """Test accuracy with inference statistics recomputed from ``samples`` training
    images at the training batch size, the weights fixed (``cbn_plugin.recompute_statistics``:
    each CBN layer pools its window of k batches as training did; BN layers are
    fvcore's PreciseBN). Changes the model's running statistics."""
    order = torch.from_numpy(np.random.default_rng(4321).permutation(len(xtr)))
    num = max(1, samples // batch)
    windows = [layer.window_size for _, layer in cbn_plugin.cbn_layers(model)]
    num = max(num, max(windows, default=1))
    picks = order.repeat(num * batch // len(xtr) + 1)
    batches = (xtr[picks[i * batch:(i + 1) * batch]] for i in range(num))
    cbn_plugin.recompute_statistics(model, batches, num_batches=num,
                                    forward=lambda m, b: m(b))
    return dict(acc_precise=evaluate(model, xte, yte), precise_batches=num)


# ----------------------------------------------------------------------------- grid

BACKWARDS = ('current', 'pooled', 'compensated')
FORMS = ('mu_nu', 'var')


def cbn_label(backward: str, compensation: str) -> str:
    return f'CBN ({backward}, {compensation})'


PAPER = cbn_label('current', 'mu_nu')
DEFAULT = cbn_label(LAYER_DEFAULTS['stats_backward'], LAYER_DEFAULTS['compensation'])
PLAIN = 'CBN() (k=4)'
NORMS = {  # row label -> norm spec (window filled in per batch)
    'BN': dict(kind='bn'),
    'GN': dict(kind='gn'),
    'naive CBN': dict(kind='cbn', rho=0.0, backward='current', compensation='mu_nu'),
}
for _b in BACKWARDS:
    for _c in FORMS:
        NORMS[cbn_label(_b, _c)] = dict(kind='cbn', rho=1.0, backward=_b, compensation=_c)
# the paper's layer exactly (mode='paper'): its own running statistics from the batch
NORMS[PAPER]['running_stats'] = 'batch'
# norm_cfg=dict(type='CBN'): every argument the layer's default, window 4 at every batch
NORMS[PLAIN] = dict(kind='cbn', plain=True, window=LAYER_DEFAULTS['window_size'])
CBN_COMBOS = [cbn_label(b, c) for b in BACKWARDS for c in FORMS]


def display(label: str) -> str:
    """Row name: says which row is the layer's defaults and which is the paper."""
    if label == DEFAULT:
        return f'{label} = CBN(window_size=k)'
    if label == PAPER:
        return f'{label} = paper'
    return label


def is_cbn(label: str) -> bool:
    return NORMS[label]['kind'] == 'cbn'


def window_for(batch: int) -> int:
    return max(1, LARGEST_BATCH // batch)


def lr_for(batch: int, base: float) -> float:
    return base * batch / LARGEST_BATCH


def spec_for(label: str, batch: int, window: int | None = None) -> dict:
    spec = dict(NORMS[label])
    if spec['kind'] == 'cbn' and not spec.get('plain'):
        k = window or window_for(batch)
        if k == 1:  # window 1 is BN's computation whatever the other options: one run
            return dict(kind='cbn', window=1)
        spec['window'] = k
    return spec


def build_grid(args) -> list[dict]:
    jobs = []
    base = dict(samples=args.samples, wd=5e-4, measure=0)

    def add(group, label, batch, base_lr, seed, task='lowres', arch='cnn', window=None,
            measure=None):
        spec = spec_for(label, batch, window)
        if measure is None:
            measure = args.measure if spec['kind'] == 'cbn' and spec['window'] > 1 \
                else args.measure_bn
        jobs.append(dict(base, group=group, label=label, task=task, arch=arch, norm=spec,
                         batch=batch, lr=lr_for(batch, base_lr), base_lr=base_lr, seed=seed,
                         measure=measure))

    for seed in range(args.seeds):
        for b in args.batches:
            for label in args.norms:
                if seed == 0 or label in args.seed_norms:
                    add('main', label, b, args.base_lr, seed)
        for b in args.raw_batches:
            add('raw', 'BN', b, args.base_lr, seed, task='raw', measure=0)
    for seed in range(args.resnet_seeds):
        for b in args.resnet_batches:
            for label in args.resnet_norms:
                add('resnet', label, b, args.base_lr, seed, arch='resnet',
                    measure=args.measure if is_cbn(label) and b < LARGEST_BATCH else 0)
    for seed in range(args.second_seeds):
        for b in args.second_batches:
            for label in args.second_norms:
                add('second', label, b, args.base_lr, seed, task=args.second_task,
                    arch=args.second_arch, measure=0)
    for base_lr in args.sweep_base_lrs:
        for b in args.lr_batches:
            for label in args.lr_norms:
                if b == LARGEST_BATCH and is_cbn(label):
                    continue  # k = 1: BN
                if b not in args.lr_paper_batches and label == PAPER:
                    continue
                add('lrsweep', label, b, base_lr, 0)
        for k in args.sweep_windows:
            for label in args.sweep_norms:
                add('sweep', label, args.sweep_batch, base_lr, 0, window=k)
    # more seeds where the defaults fall short: the largest lr, batch 2
    top = max(args.sweep_base_lrs)
    for seed in range(1, args.top_lr_seeds):
        for b, label in ((LARGEST_BATCH, 'BN'), (2, 'BN'), (2, 'GN'), (2, DEFAULT)):
            if b in args.lr_batches and label in args.lr_norms:
                add('lrsweep', label, b, top, seed)
    return jobs


def _key(cfg):
    return json.dumps({k: v for k, v in cfg.items()
                       if k not in ('group', 'label', 'measure', 'base_lr')}, sort_keys=True)


def _cost(cfg):
    per_step = 1.0 + (2.0 if cfg['norm']['kind'] == 'cbn' else 0.0)
    per_step *= 3 if cfg['arch'] == 'resnet' else 1
    return cfg['samples'] // cfg['batch'] * per_step


# The order runs start in: the goal's evidence first (main grid, the second setting's
# first seed, learning rates), then the rest; largest first within each part.
PRIORITY = {'main': 0, 'second': 1, 'lrsweep': 2, 'sweep': 3, 'raw': 4, 'resnet': 5}


def _order(cfg):
    later = cfg['group'] in ('second', 'resnet') and cfg['seed'] > 0
    return (6 if later else PRIORITY.get(cfg['group'], 6), -_cost(cfg))


def _worker(cfg):
    try:
        return train_run(cfg)
    except Exception as exc:  # a crash is a result too
        return dict(cfg=cfg, acc=float('nan'), acc_window=float('nan'), final_loss=float('nan'),
                    status=f'crash: {type(exc).__name__}: {exc}'[:200], steps=0, steps_done=0,
                    time=0.0)


def run_jobs(jobs, workers: int, log=print, cache: Path | None = None):
    """Run the distinct jobs (largest first, ``workers`` processes); one result per job.

    ``cache``: a json-lines file; every finished run is appended to it, and runs found in
    it are not run again (an interrupted study resumes where it stopped).
    """
    unique = {}
    for cfg in jobs:
        key = _key(cfg)
        if key not in unique or cfg.get('measure', 0) > unique[key].get('measure', 0):
            unique[key] = cfg
    done = {}
    if cache is not None and cache.is_file():
        for line in cache.read_text().splitlines():
            res = json.loads(line)
            key = _key(res['cfg'])
            if key in unique and res['cfg'].get('measure', 0) >= unique[key].get('measure', 0):
                done[key] = res
        log(f'{len(done)} runs taken from {cache}')
    todo = sorted((c for k, c in unique.items() if k not in done), key=_order)
    start = time.perf_counter()
    if workers <= 1:
        results = map(_worker, todo)
    else:
        import multiprocessing as mp
        pool = mp.get_context('spawn').Pool(workers)
        results = pool.imap_unordered(_worker, todo)
    for i, res in enumerate(results):
        done[_key(res['cfg'])] = res
        if cache is not None:
            with cache.open('a') as f:
                f.write(json.dumps(res, default=float) + '\n')
        c = res['cfg']
        log(f'[{i + 1}/{len(todo)} {time.perf_counter() - start:6.0f}s] {c["group"]:7s} '
            f'{c["arch"]:6s} {c["label"]:22s} b={c["batch"]:<2d} lr={c["lr"]:.4g} '
            f'k={c["norm"].get("window", "-")} seed={c["seed"]}: acc {res["acc"]:.3f}'
            f'/{res["acc_window"]:.3f} loss {res["final_loss"]:.3f} {res["time"]:.0f}s '
            f'{res["status"]}')
    if workers > 1:
        pool.close()
        pool.join()
    out = []
    for cfg in jobs:
        res = dict(done[_key(cfg)])
        res['cfg'] = cfg
        out.append(res)
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------- report

def _fmt(values, digits=3):
    vals = [v for v in values if v == v]
    if not vals:
        return 'fails'
    if len(vals) == 1:
        return f'{vals[0]:.{digits}f}'
    suffix = '' if len(vals) == len(values) else f' ({len(values) - len(vals)} failed)'
    return f'{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}{suffix}'


def _select(results, **kw):
    out = []
    for r in results:
        c = r['cfg']
        if all((c.get(k) if k != 'window' else c['norm'].get('window')) == v
               for k, v in kw.items()):
            out.append(r)
    return out


STATS = (('window', 'acc_window'), ('batch', 'acc'))


def accuracy_rows(results, group, labels, batches, window_stats=False):
    """``[(row label, [cell per batch])]`` with accuracy mean ± std over seeds."""
    rows = []
    for label in labels:
        for stats, field in (STATS if window_stats else STATS[1:]):
            if not is_cbn(label) and stats == 'window':
                continue
            cells = []
            for b in batches:
                rs = _select(results, group=group, label=label, batch=b)
                cells.append(_fmt([r[field] for r in rs]) if rs else '')
            name = display(label) if not is_cbn(label) or not window_stats else \
                f'{display(label)}, running stats from {stats}'
            rows.append((name, cells))
    return rows


def md_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join([name] + list(cells)) + ' |' for name, cells in rows]
    return '\n'.join(lines)


def _analysis_mean(rs, key, layer=None):
    vals = []
    for r in rs:
        for name, m in r.get('analysis', {}).items():
            if (layer is None or name == layer) and key in m:
                vals.append(m[key])
    return float(np.nanmean(vals)) if vals else float('nan')


def _acc(results, group, label, batch, field='acc', **kw):
    vals = [r[field] for r in _select(results, group=group, label=label, batch=batch, **kw)]
    vals = [v for v in vals if v == v]
    return (float(np.mean(vals)), float(np.min(vals))) if vals else (float('nan'),) * 2


def _pts(d):
    return f'{100 * d:+.1f}' if d == d else '-'


def goal_rows(results, args, group, labels, batches, sweep=True):
    """The goal of the defaults, per CBN row and running-statistics source.

    Points (accuracy x 100) against the bar: batch 2 and 1 minus BN at batch 32 (goal:
    >= -0.5) and minus GN at the same batch (goal: > 0), the worst gap to BN at the same
    batch over every batch < 32 (and 32 for ``CBN()``, whose k is 4 there; goal: >= 0), and
    in the learning-rate sweep (seed 0) the
    worst gap at batch 2 and 1 to BN at batch 32 and to GN, over the learning rates where
    BN at batch 32 trains (test accuracy >= ``args.trains``).
    """
    rows = []
    bn32 = _acc(results, group, 'BN', LARGEST_BATCH)[0]
    small = [b for b in (2, 1) if b in batches]
    lrs = []
    if sweep:
        for base in args.sweep_base_lrs:
            ref = _acc(results, 'lrsweep', 'BN', LARGEST_BATCH, base_lr=base)[0]
            if ref == ref and ref >= args.trains:
                lrs.append((base, ref))
    def lrs_done(label):
        return any(_select(results, group='lrsweep', label=label, base_lr=base, batch=b)
                   for base, _ in lrs if base != args.base_lr for b in small)

    for label in labels:
        if not is_cbn(label):
            continue
        for stats, field in STATS:
            cells, ok = [], True
            for b in small:
                d = _acc(results, group, label, b, field)[0] - bn32
                ok &= d >= -0.005
                cells.append(_pts(d))
            for b in small:
                d = _acc(results, group, label, b, field)[0] - _acc(results, group, 'GN', b)[0]
                ok &= d > 0
                cells.append(_pts(d))
            same = [_acc(results, group, label, b, field)[0] - _acc(results, group, 'BN', b)[0]
                    for b in batches if b < LARGEST_BATCH or NORMS[label].get('plain')]
            worst = min(same) if same else float('nan')
            ok &= worst >= 0
            ok_main = ok
            cells.append(_pts(worst))
            if sweep:
                gaps, gn_gaps = [], []
                for base, ref in lrs:
                    for b in small:
                        acc = _acc(results, 'lrsweep', label, b, field, base_lr=base)[0]
                        gaps.append(acc - ref)
                        gn_gaps.append(acc - _acc(results, 'lrsweep', 'GN', b, base_lr=base)[0])
                w, wg = (min(gaps), min(gn_gaps)) if gaps else (float('nan'),) * 2
                ok &= w >= -0.005 and wg > 0
                cells += [_pts(w), _pts(wg)]
            if sweep and not lrs_done(label):
                cells.append(('yes' if ok_main else 'no') + ' (main grid; not in the sweep)')
            else:
                cells.append('**yes**' if ok else 'no')
            rows.append((f'{display(label)}, from {stats}', cells))
    header = ['CBN row, running stats'] + [f'b{b} - BN b32' for b in small] + [
        f'b{b} - GN b{b}' for b in small] + ['worst vs BN same batch']
    if sweep:
        header += ['lr sweep: worst b2/b1 - BN b32', 'lr sweep: worst b2/b1 - GN']
    header.append('goal met')
    return header, rows, lrs


def lr_table(results, args):
    """Accuracy in the learning-rate sweep (seed 0): BN at 32, 2, 1, GN and CBN at 2, 1."""
    sweep = [r for r in results if r['cfg']['group'] == 'lrsweep']
    if not sweep:
        return ''
    rows = []
    for label in args.lr_norms:
        for b in args.lr_batches:
            if b == LARGEST_BATCH and is_cbn(label):
                continue
            cells = []
            for base in args.sweep_base_lrs:
                rs = _select(sweep, label=label, batch=b, base_lr=base)
                n = f' ({len(rs)} seeds)' if len(rs) > 1 else ''
                if not rs:
                    cells.append('')
                elif is_cbn(label):
                    cells.append(f'{_fmt([r["acc_window"] for r in rs])} / '
                                 f'{_fmt([r["acc"] for r in rs])}{n}')
                else:
                    cells.append(_fmt([r['acc'] for r in rs]) + n)
            if not any(cells):
                continue
            k = f', k={spec_for(label, b)["window"]}' if is_cbn(label) else ''
            rows.append((f'{display(label)}, batch {b}{k}', cells))
    header = ['norm, batch'] + [f'base lr {base:g} (lr at batch 2: {lr_for(2, base):g})'
                                for base in args.sweep_base_lrs]
    return md_table(header, rows)


_PALETTE = ('C0', 'C2', 'C7', 'C3', 'C1', 'C8', 'C9', 'C5', 'C4', 'C6')


def _color(label):
    return _PALETTE[list(NORMS).index(label) % len(_PALETTE)]


def plot_accuracy(results, args, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [('main', 'SmallCNN (3 norm layers), digits at 4x4', args.batches, args.norms)]
    if any(r['cfg']['group'] == 'resnet' for r in results):
        panels.append(('resnet', 'SmallResNet (9 norm layers, all swapped), 4x4',
                       args.resnet_batches, args.resnet_norms))
    if any(r['cfg']['group'] == 'second' for r in results):
        panels.append(('second', f'second setting: {args.second_arch}, {args.second_task}',
                       args.second_batches, args.second_norms))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.0), squeeze=False)
    for ax, (group, title, batches, labels) in zip(axes[0], panels):
        for label in labels:
            # CBN: window running statistics (solid); the paper also as published (batch)
            variants = [('acc', '-')] if not is_cbn(label) else [('acc_window', '-')]
            if label == PAPER:
                variants.append(('acc', ':'))
            for field, style in variants:
                xs, ms, ss = [], [], []
                for b in batches:
                    vals = [r[field] for r in _select(results, group=group, label=label, batch=b)]
                    vals = [v if v == v else 0.1 for v in vals]  # a failed run scores chance
                    if vals:
                        xs.append(b)
                        ms.append(np.mean(vals))
                        ss.append(np.std(vals))
                if xs:
                    name = display(label) + (' (running stats from batch)'
                                             if is_cbn(label) and field == 'acc' else '')
                    ax.errorbar(xs, ms, yerr=ss, fmt=style + 'o', color=_color(label),
                                label=name, capsize=3, ms=4, alpha=0.85)
        ax.set_xscale('log', base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel('batch size (window k = 32 / batch for CBN; lr ∝ batch)')
        ax.set_ylabel('test accuracy')
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        lo = min([ln.get_ydata().min() for ln in ax.get_lines() if len(ln.get_ydata())] + [0.8])
        ax.set_ylim(max(0.0, min(0.8, lo - 0.02)), None)
        ax.legend(fontsize=7, title='CBN rows: running stats from the window',
                  title_fontsize=7, loc='lower left')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_errors(results, args, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    sweep = [r for r in results if r['cfg']['group'] == 'sweep' and 'analysis' in r
             and r['cfg']['label'] == PAPER]
    if not sweep:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    est = [('current', 'current batch alone (BN)', 'C0'), ('naive', 'naive pooling', 'C7'),
           ('munu', 'CBN, (mu, nu) compensation', 'C3'),
           ('varform', 'CBN, var compensation', 'C1')]
    styles = ('-', '--', ':', '-.', (0, (1, 4)))
    for base, style in zip(args.sweep_base_lrs, styles):
        rs_lr = [r for r in sweep if r['cfg']['base_lr'] == base]
        ks = sorted({r['cfg']['norm']['window'] for r in rs_lr})
        for ax, quantity in zip(axes[:2], ('mean', 'std')):
            for key, _, color in est:
                if quantity == 'mean' and key == 'varform':
                    continue  # the same mean as the (mu, nu) form's
                ys = [_analysis_mean(_select(rs_lr, window=k), f'win_{quantity}_err_{key}')
                      for k in ks]
                ax.plot(ks, ys, 'o', linestyle=style, color=color, ms=4)
        for key, color, marker in (('neg_frac_comp', 'C3', 'o'),
                                   ('neg_frac_varform', 'C1', 's')):
            ys = [100 * _analysis_mean(_select(rs_lr, window=k), key) for k in ks]
            axes[2].plot(ks, ys, marker, linestyle=style, color=color, ms=4)
    titles = ('mean error vs the true window mean\n(RMS over channels, units of window std)',
              'std error vs the true window std\n(RMS over channels of |log sigma ratio|)',
              '% of past entries with negative variance\n(before the clamp)')
    for ax, title in zip(axes, titles):
        ax.set_xscale('log', base=2)
        ax.set_xticks(args.sweep_windows)
        ax.set_xticklabels([str(k) for k in args.sweep_windows])
        ax.set_xlabel(f'window k (batch {args.sweep_batch}, runs trained with the paper\'s '
                      'layer, mean over layers)', fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yscale('log')
    axes[1].set_yscale('log')
    lr_handles = [Line2D([], [], color='k', linestyle=st,
                         label=f'lr {lr_for(args.sweep_batch, base):g}')
                  for base, st in zip(args.sweep_base_lrs, styles)]
    axes[0].legend(handles=[Line2D([], [], color=c, marker='o', label=n) for k, n, c in est
                            if k != 'varform'] + lr_handles, fontsize=7)
    axes[1].legend(handles=[Line2D([], [], color=c, marker='o', label=n) for _, n, c in est],
                   fontsize=7)
    axes[2].legend(handles=[Line2D([], [], color='C3', marker='o', label='(mu, nu) form'),
                            Line2D([], [], color='C1', marker='s', label='var form')]
                   + lr_handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


ESTIMATES = (('current', 'current batch alone (BN)'), ('naive', 'naive pooling (rho=0)'),
             ('munu', 'CBN, (mu, nu) compensation (the paper\'s; what these runs used)'),
             ('varform', 'CBN, var compensation'))


def error_tables(results, group, label, batches):
    """Per batch and layer: errors vs the true window and vs the population."""
    lines = []
    rows = []
    for b in batches:
        rs = [r for r in _select(results, group=group, label=label, batch=b) if 'analysis' in r]
        if not rs:
            continue
        for layer in sorted({n for r in rs for n in r['analysis']}):
            cells = []
            for key, _ in ESTIMATES:
                cells.append(f'{_analysis_mean(rs, f"win_mean_err_{key}", layer):.3f} / '
                             f'{_analysis_mean(rs, f"win_std_err_{key}", layer):.3f}')
            cells.append(f'{_analysis_mean(rs, "pop_mean_err_truth", layer):.3f} / '
                         f'{_analysis_mean(rs, "pop_std_err_truth", layer):.3f}')
            for key in ('current', 'cbn'):
                cells.append(f'{_analysis_mean(rs, f"pop_mean_err_{key}", layer):.3f} / '
                             f'{_analysis_mean(rs, f"pop_std_err_{key}", layer):.3f}')
            rows.append((f'{b} (k={window_for(b)}) {layer}', cells))
    if rows:
        header = ['batch (window) layer'] + [n for _, n in ESTIMATES] + [
            'true window vs population', 'current vs population', 'CBN vs population']
        lines.append(md_table(header, rows))
    return '\n'.join(lines)


def _dmu2_share(g):
    """d_mu^2 over the (mu, nu) form's net under-estimate, from run-averaged metrics.

    The (mu, nu) bias is the var-form bias minus d_mu^2, so the net under-estimate is
    d_mu^2 - (var-form bias); a share above 1 means the var-form over-estimates on net.
    """
    dmu2, under = g('entry_dmu2'), g('entry_dmu2') - g('entry_var_bias_varform')
    return dmu2 / under if under > 0 else float('nan')


def _fixed_cell(g):
    """Share of the (mu,nu) form's negative entries that the var form does not have.

    The var form's entries are the (mu,nu) form's plus d_mu^2 >= 0, so its negatives are
    a subset: 1 - neg_varform / neg_(mu,nu), from the run-averaged fractions.
    """
    neg = g('neg_frac_comp')
    return f'{100 * (1 - g("neg_frac_varform") / neg):.0f}' if neg > 0 else '-'


def entry_table(results, group, label, batches):
    rows = []
    for b in batches:
        rs = [r for r in _select(results, group=group, label=label, batch=b) if 'analysis' in r]
        if not rs or 'entry_dmu2' not in next(iter(rs[0]['analysis'].values())):
            continue
        for layer in sorted({n for r in rs for n in r['analysis']}):
            g = lambda k: _analysis_mean(rs, k, layer)  # noqa: E731
            rows.append((f'{b} (k={window_for(b)}) {layer}', [
                f'{g("entry_mean_err_naive"):.3f} / {g("entry_mean_err_comp"):.3f}',
                f'{g("entry_var_bias_naive"):+.3f} / {g("entry_var_bias_comp"):+.3f} / '
                f'{g("entry_var_bias_varform"):+.3f}',
                f'{g("entry_var_abs_naive"):.3f} / {g("entry_var_abs_comp"):.3f} / '
                f'{g("entry_var_abs_varform"):.3f}',
                f'{g("entry_dmu2"):.3f}', f'{_dmu2_share(g):.2f}',
                f'{100 * g("neg_frac_comp"):.1f} / {100 * g("neg_frac_varform"):.1f}',
                _fixed_cell(g)]))
    if not rows:
        return ''
    header = ['batch (window) layer', 'mean err: stored / compensated',
              'var bias: stored / (mu,nu) / var-form', 'var abs err: stored / (mu,nu) / var-form',
              'd_mu^2', 'd_mu^2 share of (mu,nu) under-estimate',
              '% negative: (mu,nu) / var-form', '% of negatives fixed by var-form']
    return md_table(header, rows)


def sweep_tables(results, args):
    rows_acc, rows_err = [], []
    sweep = [r for r in results if r['cfg']['group'] == 'sweep']
    if not sweep:
        return '', ''
    b = args.sweep_batch
    header_acc = ['norm', 'k'] + [f'lr {lr_for(b, base):g}' for base in args.sweep_base_lrs]
    rows_acc.append(('BN', ['1'] + [_fmt([r['acc'] for r in _select(
        results, group='lrsweep', label='BN', batch=b, base_lr=base)])
        for base in args.sweep_base_lrs]))
    for label in args.sweep_norms:
        for k in args.sweep_windows:
            if not _select(sweep, label=label, window=k):
                continue
            cells = [str(k)]
            for base in args.sweep_base_lrs:
                rs = _select(sweep, label=label, base_lr=base, window=k)
                cells.append(' / '.join(_fmt([r[f]]) for r in rs for f in ('acc_window', 'acc'))
                             + (f' (loss {rs[0]["final_loss"]:.2f})' if rs else ''))
            rows_acc.append((display(label), cells))
    header_err = ['run', 'k', 'lr', 'mean err: current / naive / (mu,nu) / var',
                  'std err: current / naive / (mu,nu) / var', '% negative (mu,nu) / var',
                  'd_mu^2 share of (mu,nu) under-estimate', 'cos(grad W, W)', '|W| growth',
                  'gradient cos with large-batch BN: current / pooled / BN at this batch / '
                  'compensated']
    for label in args.sweep_norms:
        for base in args.sweep_base_lrs:
            for k in args.sweep_windows:
                rs = [r for r in _select(sweep, label=label, base_lr=base, window=k)
                      if 'analysis' in r]
                if not rs:
                    continue
                g = lambda key: _analysis_mean(rs, key)  # noqa: E731
                cos = np.mean([np.mean(list(r['radial_cos'].values())) for r in rs])
                growth = np.mean([np.mean([v[-1] / v[0] for v in r['weight_norm'].values()])
                                  for r in rs])
                rows_err.append((display(label), [
                    str(k), f'{lr_for(b, base):g}',
                    ' / '.join(f'{g(f"win_mean_err_{e}"):.3f}' for e, _ in ESTIMATES),
                    ' / '.join(f'{g(f"win_std_err_{e}"):.3f}' for e, _ in ESTIMATES),
                    f'{100 * g("neg_frac_comp"):.1f} / {100 * g("neg_frac_varform"):.1f}',
                    f'{_dmu2_share(g):.2f}', f'{cos:+.3f}', f'{growth:.2f}',
                    _fidelity_cell(rs)]))
    bn_rows = []
    for base in args.sweep_base_lrs:
        rs = [r for r in _select(results, group='lrsweep', label='BN', batch=b, base_lr=base)
              if 'radial_cos' in r]
        if rs:
            cos = np.mean([np.mean(list(r['radial_cos'].values())) for r in rs])
            growth = np.mean([np.mean([v[-1] / v[0] for v in r['weight_norm'].values()])
                              for r in rs])
            bn_rows.append(('BN', ['1', f'{lr_for(b, base):g}', '', '', '', '', f'{cos:+.3f}',
                                   f'{growth:.2f}', '']))
    return md_table(header_acc, rows_acc), md_table(header_err, rows_err + bn_rows)


def _fidelity_cell(rs):
    rs = [r for r in rs if 'grad_fidelity' in r]
    if not rs:
        return ''
    return ' / '.join(f'{np.mean([r["grad_fidelity"].get(f"cos_{m}", np.nan) for r in rs]):.2f}'
                      for m in FIDELITY)


def fidelity_table(results, group, labels, batches):
    """Per CBN variant and batch: gradient cosines with the large-batch BN gradient."""
    rows = []
    for label in labels:
        if not is_cbn(label):
            continue
        cells = [_fidelity_cell(_select(results, group=group, label=label, batch=b))
                 for b in batches if b < LARGEST_BATCH]
        if any(cells):
            rows.append((f'trained with {display(label)}', cells))
    return md_table(['run'] + [f'batch {b} (k={window_for(b)})' for b in batches
                               if b < LARGEST_BATCH], rows)


def radial_table(results, group, labels, batches):
    rows = []
    for label in labels:
        cells = []
        for b in batches:
            rs = [r for r in _select(results, group=group, label=label, batch=b)
                  if 'radial_cos' in r]
            if not rs:
                cells.append('')
                continue
            cos = np.mean([np.mean(list(r['radial_cos'].values())) for r in rs])
            growth = np.mean([np.mean([v[-1] / v[0] for v in r['weight_norm'].values()])
                              for r in rs])
            cells.append(f'{cos:+.3f} ({growth:.2f})')
        rows.append((display(label), cells))
    return md_table(['norm'] + [f'batch {b}' for b in batches], rows)


def running_error_rows(results, group, labels, batches):
    """Per norm (and running-statistics rule): running stats vs the test-time inputs."""
    rows = []
    for label in labels:
        if NORMS[label]['kind'] == 'gn':
            continue
        rules = ('window', 'batch') if is_cbn(label) else ('batch',)
        for rule in rules:
            cells = []
            for b in batches:
                rs = [r['running_error'][rule] for r in _select(results, group=group,
                                                                 label=label, batch=b)
                      if rule in r.get('running_error', {})]
                cells.append(f'{np.mean([e["mean"] for e in rs]):.3f} / '
                             f'{np.mean([e["std"] for e in rs]):.3f}' if rs else '')
            rows.append((display(label) if len(rules) == 1 else f'{display(label)}, from {rule}',
                         cells))
    return rows


def loss_rows(results, group, labels, batches):
    rows = []
    for label in labels:
        rows.append((display(label), [_fmt([r['final_loss'] for r in _select(
            results, group=group, label=label, batch=b)], 2) for b in batches]))
    return rows


def failures(results):
    lines = []
    seen = set()
    for r in results:
        if r['status'] != 'ok':
            c = r['cfg']
            key = (c['group'], c['arch'], c['label'], c['batch'], c['lr'], c['seed'])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f'- {c["group"]}/{c["arch"]} {c["label"]} batch {c["batch"]} '
                         f'lr {c["lr"]:g} seed {c["seed"]}: {r["status"]}')
    return '\n'.join(lines)


def checks(results) -> str:
    """The study's self-checks, worst over every run: it measured the layer that trained."""
    def worst(values):
        values = [v for v in values if v == v]
        return f'{max(values):.1e}' if values else '-'
    ema = [r['ema_check'] for r in results if 'ema_check' in r]
    fid = [r['grad_fidelity'] for r in results if 'grad_fidelity' in r]
    ana = [m for r in results for m in r.get('analysis', {}).values() if 'check_mean' in m]
    return (f'Self-checks, worst over all runs: the study\'s copy of each running-statistics '
            f'rule vs the layer\'s own {worst(ema)}; the analysis\'s compensated past entries '
            f'vs `layer.past_entries()` {worst([m["check_mean"] for m in ana])} (mean) / '
            f'{worst([m["check_var"] for m in ana])} (var); the layer copy\'s gradient under '
            f'the run\'s own `stats_backward` vs the training step\'s (relative) '
            f'{worst([f["check"] for f in fid])}, its loss vs the training loss '
            f'{worst([f.get("check_forward", float("nan")) for f in fid])}.')


def headline(results, args) -> list[str]:
    """The numbers the text of docs/small_batch.md refers to, computed from this run."""
    out = []
    small = min(args.batches)
    b2 = 2 if 2 in args.batches else small
    top = max(args.batches)
    if args.raw_batches:
        out.append('raw 8x8, BN: ' + ', '.join(
            f'batch {b} {_acc(results, "raw", "BN", b)[0]:.3f}' for b in args.raw_batches))

    def row(group, label, b):
        if not is_cbn(label):
            return f'{label} {_acc(results, group, label, b)[0]:.3f}'
        return (f'{label} {_acc(results, group, label, b, "acc_window")[0]:.3f} / '
                f'{_acc(results, group, label, b)[0]:.3f}')
    for b in sorted({top, b2, small}, reverse=True):
        out.append(f'4x4, batch {b} (CBN: running stats from window / from batch): ' + ', '.join(
            row('main', label, b) for label in args.norms
            if b < LARGEST_BATCH or not is_cbn(label) or label == PLAIN))
    if any(r['cfg']['group'] == 'resnet' for r in results):
        rb = min(args.resnet_batches)
        out.append(f'ResNet, every norm swapped, batch {rb} (window / batch stats; worst seed): '
                   + ', '.join(
                       row('resnet', label, rb) + (
                           f' (worst {_acc(results, "resnet", label, rb, "acc_window")[1]:.3f}'
                           f' / {_acc(results, "resnet", label, rb)[1]:.3f})'
                           if is_cbn(label) else '')
                       for label in args.resnet_norms))
    if any(r['cfg']['group'] == 'second' for r in results):
        for b in sorted(args.second_batches, reverse=True):
            out.append(f'second setting ({args.second_arch}, {args.second_task}), batch {b}: '
                       + ', '.join(row('second', label, b) for label in args.second_norms))
    for b in sorted({b2, small}, reverse=True):
        rs = [r for r in _select(results, group='main', label=PAPER, batch=b) if 'analysis' in r]
        if not rs:
            continue
        g = lambda k: _analysis_mean(rs, k)  # noqa: E731
        out.append(
            f'statistics error at batch {b} (k={window_for(b)}), runs of the paper\'s layer, '
            f'mean over layers, mean / std error vs the true window: current batch '
            f'{g("win_mean_err_current"):.3f} / {g("win_std_err_current"):.3f}, naive '
            f'{g("win_mean_err_naive"):.3f} / {g("win_std_err_naive"):.3f}, (mu,nu) '
            f'{g("win_mean_err_munu"):.3f} / {g("win_std_err_munu"):.3f}, var '
            f'{g("win_mean_err_varform"):.3f} / {g("win_std_err_varform"):.3f}; past entries '
            f'with negative variance {100 * g("neg_frac_comp"):.1f} % ((mu,nu) form) vs '
            f'{100 * g("neg_frac_varform"):.1f} % (var form); d_mu^2 share of the (mu,nu) '
            f'under-estimate {_dmu2_share(g):.2f}')
    fid = []
    for b in args.batches:
        rs = [r for r in _select(results, group='main', batch=b) if 'grad_fidelity' in r
              and r['cfg']['norm'].get('rho', 1.0) == 1.0 and not r['cfg']['norm'].get('plain')]
        if rs:
            fid.append(f'batch {b} (k={window_for(b)}) ' + '/'.join(
                f'{np.mean([r["grad_fidelity"].get(f"cos_{m}", np.nan) for r in rs]):.2f}'
                for m in FIDELITY))
    if fid:
        out.append('gradient cosine with the large-batch BN gradient, current / pooled / BN at '
                   'this batch / compensated (all compensating CBN runs): ' + ', '.join(fid))
    if any(r['cfg']['group'] == 'lrsweep' for r in results):
        for b in args.lr_batches:
            out.append(f'lr sweep, batch {b}, window stats for CBN (base lr ' + ', '.join(
                f'{base:g}' for base in args.sweep_base_lrs) + '): ' + '; '.join(
                f'{label} ' + ' '.join(
                    f'{_acc(results, "lrsweep", label, b, "acc_window" if is_cbn(label) else "acc", base_lr=base)[0]:.3f}'  # noqa: E501
                    for base in args.sweep_base_lrs)
                for label in args.lr_norms if _select(results, group='lrsweep', label=label,
                                                      batch=b)))
    return out


def render(results, args, wall, meta) -> str:
    b_hdr = ['norm'] + [f'batch {b}' for b in args.batches]
    header, rows, lrs = goal_rows(results, args, 'main', args.norms, args.batches,
                                  sweep=any(r['cfg']['group'] == 'lrsweep' for r in results))
    parts = [
        f'Generated by `{meta["command"]}` on {meta["when"]} ({meta["machine"]}); '
        f'wall time {wall / 60:.1f} min with {args.workers} worker processes '
        f'(load average at start {meta["load_start"]}, at end {meta["load_end"]}).'
        + (f' {meta["note"]}' if meta.get('note') else ''),
        '',
        f'Setup: {args.samples} training samples seen per run at every batch size; SGD '
        f'momentum 0.9, weight decay 5e-4, cosine decay; lr = {args.base_lr:g} x batch / 32; '
        f'CBN window k = 32 / batch (batch 1: k = 32) except `{PLAIN}` (k = 4 at every '
        f'batch), rho 1, burn-in 0, variance rule clamp; the layer\'s defaults '
        f'(`mode=\'default\'`): stats_backward={LAYER_DEFAULTS["stats_backward"]!r}, '
        f'compensation={LAYER_DEFAULTS["compensation"]!r}, '
        f'running_stats={LAYER_DEFAULTS["running_stats"]!r}; {args.seeds} seeds (mean ± std) for '
        f'{", ".join(args.seed_norms)}, seed 0 for the other rows; '
        f'test set 719 images.',
        '',
        checks(results),
        '',
        '### The goal of the defaults (SmallCNN, 4x4 digits)',
        '',
        'Points (accuracy x 100). BN at batch 32 trains (test accuracy >= '
        f'{args.trains:g}) in the learning-rate sweep at base lr '
        + (', '.join(f'{base:g} ({ref:.3f})' for base, ref in lrs) or 'none') + '. '
        'Goal: batch 2 and 1 >= BN at batch 32 - 0.5 and > GN, there and at every such '
        'learning rate of the sweep (seed 0; at the largest lr BN and the defaults at batch 2 '
        f'and BN at batch 32 with {args.top_lr_seeds} seeds, mean), and >= BN at the same batch '
        'at every batch.',
        '',
        md_table(header, rows),
        '',
        '### Headline numbers',
        '',
        '\n'.join(f'{i + 1}. {line}' for i, line in enumerate(headline(results, args))),
        '',
        '### Raw 8x8 digits (section 6\'s data): BN at small batch',
        '',
        md_table(['norm'] + [f'batch {b}' for b in args.raw_batches],
                 accuracy_rows(results, 'raw', ['BN'], args.raw_batches)),
        '',
        '### Test accuracy, digits at 4x4 (SmallCNN, every norm swapped)',
        '',
        'At batch 32 every CBN row with k = 32 / batch has k = 1, i.e. is BN (one shared '
        'run).',
        '',
        md_table(b_hdr, accuracy_rows(results, 'main', args.norms, args.batches, True)),
        '',
        'Final training loss (mean of the last 10 % of steps, training-mode forward):',
        '',
        md_table(b_hdr, loss_rows(results, 'main', args.norms, args.batches)),
        '',
        'Inference statistics: how far the final running statistics are from the '
        'statistics each layer actually receives at test time (512 training images through '
        'the eval-mode network), `mean error / std error` as in the analysis below, mean '
        'over the layers:',
        '',
        md_table(b_hdr, running_error_rows(results, 'main', args.norms, args.batches)),
        '',
    ]
    lr_tab = lr_table(results, args)
    if lr_tab:
        parts += [
            '### Learning rate: BN at batch 32 against batch 2 and 1 (seed 0 unless a cell says)',
            '',
            'Linear scaling as in the main grid: the lr at batch b is base lr x b / 32. CBN '
            'cells: `running stats from window / from batch`.',
            '',
            lr_tab,
            '',
        ]
    if any(r['cfg']['group'] == 'resnet' for r in results):
        r_hdr = ['norm'] + [f'batch {b}' for b in args.resnet_batches]
        parts += [
            f'### Every BN of a ResNet replaced (SmallResNet, 9 norm layers, stem included; '
            f'{args.resnet_seeds} seeds)',
            '',
            md_table(r_hdr, accuracy_rows(results, 'resnet', args.resnet_norms,
                                          args.resnet_batches, True)),
            '',
            'Final training loss:',
            '',
            md_table(r_hdr, loss_rows(results, 'resnet', args.resnet_norms,
                                      args.resnet_batches)),
            '',
        ]
    if any(r['cfg']['group'] == 'second' for r in results):
        s_hdr = ['norm'] + [f'batch {b}' for b in args.second_batches]
        h2, rows2, _ = goal_rows(results, args, 'second', args.second_norms,
                                 args.second_batches, sweep=False)
        parts += [
            f'### Second setting: {args.second_arch} on `{args.second_task}` digits '
            f'({args.second_seeds} seeds)',
            '',
            md_table(s_hdr, accuracy_rows(results, 'second', args.second_norms,
                                          args.second_batches, True)),
            '',
            'Final training loss:',
            '',
            md_table(s_hdr, loss_rows(results, 'second', args.second_norms,
                                      args.second_batches)),
            '',
            'The goal, in this setting (points):',
            '',
            md_table(h2, rows2),
            '',
        ]
    parts += [
        f'### Statistics error per layer (SmallCNN, runs of the paper\'s layer `{PAPER}`)',
        '',
        'Each cell is `mean error / std error`: the mean error in units of the reference '
        'std (RMS over channels) and |log(sigma_est / sigma_ref)| (RMS over channels), '
        f'averaged over {args.measure} points per run (evenly spread over training once the '
        'window is full) and over seeds. Reference in the first four columns: the true '
        'window statistics (the window\'s raw batches pushed through the current network). '
        'Both compensations are computed from the same stored statistics and derivatives.',
        '',
        error_tables(results, 'main', PAPER, args.batches),
        '',
        '### Past entries: compensation and the d_mu^2 term (same runs)',
        '',
        'Per past (step, channel) entry against its true value under the current network. '
        '"var bias" and "var abs err" are sum(est - true) and sum|est - true| over '
        'sum(true); "(mu,nu)" is the paper\'s compensation '
        '(var_old + <dvar/dW, dW> - d_mu^2, before the clamp), "var-form" is the layer\'s '
        '`compensation=\'var\'` (the same plus d_mu^2). "d_mu^2 share" is '
        'd_mu^2 / (d_mu^2 - var-form bias), the part of the (mu,nu) form\'s net '
        'under-estimate that the d_mu^2 term makes (the rest, the var-form bias, is '
        'dW^T C dW plus everything upstream of the conv that the truncation ignores).',
        '',
        entry_table(results, 'main', PAPER, args.batches),
        '',
    ]
    acc_sweep, err_sweep = sweep_tables(results, args)
    if acc_sweep:
        parts += [
            f'### Window and learning rate (batch {args.sweep_batch}, seed 0, '
            f'{args.samples} samples)',
            '',
            'Test accuracy, `running stats from window / from batch` (final training loss):',
            '',
            acc_sweep,
            '',
            'Statistics error (mean over the 3 layers and the measurement points; columns '
            'as above) and the gradient\'s radial component: mean over convs and channels of '
            'cos(dL/dW_j, W_j), and the growth of the mean per-channel ||W_j|| from the first '
            'to the last measurement:',
            '',
            err_sweep,
            '',
        ]
    parts += [
        '### Which backward is closest to the large-batch gradient? (SmallCNN)',
        '',
        'At the same analysis points, the conv-weight gradient of this batch\'s loss under '
        'each backward, compared (cosine, mean over the convs) with the ideal: the '
        'gradient through BN over the union of this batch and the window\'s old batches '
        '(all under the current weights; large-batch BN, what CBN approximates). Cells: '
        '`current (the paper) / pooled / BN at this batch alone / compensated`. The three '
        'CBN backwards are the layer\'s own: a copy of the network loaded from the '
        'state_dict (window included) with `stats_backward` set, one training forward and '
        'backward; the copy under the run\'s own backward reproduces the training gradient '
        '(self-checks above). Naive CBN\'s past entries do not depend on the weights: no '
        '"compensated" column.',
        '',
        fidelity_table(results, 'main', args.norms, args.batches),
        '',
        '### Gradient radial component in the main grid: cos(dL/dW_j, W_j) (|W| growth)',
        '',
        radial_table(results, 'main', args.norms, args.batches),
        '',
    ]
    fail = failures(results)
    if fail:
        parts += ['### Runs that did not finish', '', fail, '']
    parts += ['![accuracy vs batch](small_batch.png)', '',
              '![statistics error vs window and lr](small_batch_errors.png)']
    return '\n'.join(parts)


def write_md(path: Path, block: str, begin: str = DOC_BEGIN, end: str = DOC_END,
             intro: str = '# Small-batch study\n\n'):
    """Replace the generated block between ``begin`` and ``end`` (``intro`` + block if new)."""
    text = path.read_text() if path.is_file() else ''
    new = f'{begin}\n{block}\n{end}'
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + new + tail
    else:
        text = (text or intro) + new + '\n'
    path.write_text(text)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out-dir', type=Path, default=REPO / 'docs')
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--tiny', action='store_true',
                    help='1 seed, 2 batch sizes, a few steps: checks the pipeline in seconds')
    ap.add_argument('--cache', type=Path, default=None,
                    help='json-lines file of finished runs: appended to, and reused (resume)')
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--samples', type=int, default=4096)
    ap.add_argument('--base-lr', type=float, default=0.1, help='lr at batch 32')
    ap.add_argument('--batches', type=int, nargs='+', default=[32, 8, 4, 2, 1])
    ap.add_argument('--norms', nargs='+', default=list(NORMS), choices=list(NORMS))
    ap.add_argument('--seed-norms', nargs='+', choices=list(NORMS), default=[
        'BN', 'GN', PAPER, cbn_label('compensated', 'mu_nu'), DEFAULT, PLAIN],
                    help='main-grid rows trained with every seed; the others with seed 0 only')
    ap.add_argument('--raw-batches', type=int, nargs='+', default=[32, 2, 1])
    ap.add_argument('--resnet-batches', type=int, nargs='+', default=[32, 2])
    ap.add_argument('--resnet-norms', nargs='+', choices=list(NORMS), default=[
        'BN', 'GN', PAPER, DEFAULT, PLAIN])
    ap.add_argument('--resnet-seeds', type=int, default=1)
    ap.add_argument('--second-task', default='shift5', choices=['raw', 'lowres', 'shift5'])
    ap.add_argument('--second-arch', default='resnet', choices=list(ARCHS))
    ap.add_argument('--second-batches', type=int, nargs='+', default=[32, 2, 1])
    ap.add_argument('--second-norms', nargs='+', choices=list(NORMS),
                    default=['BN', 'GN', PAPER, DEFAULT, PLAIN])
    ap.add_argument('--second-seeds', type=int, default=2)
    ap.add_argument('--sweep-base-lrs', type=float, nargs='+', default=[0.1, 0.32, 0.8, 1.6],
                    help='lr at batch 32 (linear scaling below); 0.1 is the main grid\'s')
    ap.add_argument('--lr-batches', type=int, nargs='+', default=[32, 2, 1])
    ap.add_argument('--lr-norms', nargs='+', choices=list(NORMS),
                    default=['BN', 'GN', PAPER, DEFAULT, PLAIN])
    ap.add_argument('--lr-paper-batches', type=int, nargs='+', default=[2],
                    help='batches of the learning-rate sweep that also train the paper\'s layer')
    ap.add_argument('--top-lr-seeds', type=int, default=3,
                    help='seeds at the largest base lr for BN at 32 and 2, GN and the defaults '
                    'at batch 2 (the rest of the sweep: seed 0)')
    ap.add_argument('--sweep-batch', type=int, default=2)
    ap.add_argument('--sweep-windows', type=int, nargs='+', default=[4, 16])
    ap.add_argument('--sweep-norms', nargs='+', choices=list(NORMS), default=[PAPER])
    ap.add_argument('--trains', type=float, default=0.5,
                    help='BN at batch 32 "trains" at an lr when its test accuracy is at least this')
    ap.add_argument('--from-json', type=Path, default=None,
                    help='re-render the md and plots from an earlier run\'s json (no training)')
    ap.add_argument('--precise', action='store_true',
                    help='only the inference-statistics comparison: running statistics from '
                         'the batches, from the window, and recomputed after training '
                         '(PreciseBN/PreciseCBN); writes small_batch_precise.md/json')
    ap.add_argument('--precise-batches', type=int, nargs='+', default=[32, 2, 1])
    ap.add_argument('--precise-norms', nargs='+', choices=list(NORMS), default=['BN', DEFAULT])
    ap.add_argument('--precise-samples', type=int, default=1024,
                    help='training images the recomputed statistics see')
    ap.add_argument('--measure', type=int, default=6, help='analysis points per CBN run')
    ap.add_argument('--measure-bn', type=int, default=4,
                    help='gradient-direction points per non-CBN run')
    args = ap.parse_args(argv)
    if args.tiny:
        args.seeds, args.samples, args.batches = 1, 48, [8, 2]
        args.raw_batches, args.resnet_batches, args.resnet_seeds = [8], [2], 1
        args.resnet_norms = ['BN', PAPER, DEFAULT]
        args.second_batches, args.second_seeds = [8, 2], 1
        args.sweep_windows, args.sweep_base_lrs = [2, 4], [0.1, 0.8]
        args.lr_batches, args.lr_paper_batches = [32, 2], [2]
        args.sweep_norms = [PAPER, DEFAULT]
        args.lr_norms = ['BN', 'GN', PAPER, DEFAULT]
        args.measure, args.measure_bn, args.top_lr_seeds = 3, 2, 2
        args.precise_batches, args.precise_samples = [32, 2], 64
    return args


def build_precise_grid(args) -> list[dict]:
    jobs = []
    for seed in range(args.seeds):
        for b in args.precise_batches:
            for label in args.precise_norms:
                if b == LARGEST_BATCH and is_cbn(label):
                    continue  # k = 1: BN
                jobs.append(dict(group='precise', label=label, task='lowres', arch='cnn',
                                 norm=spec_for(label, b), batch=b, lr=lr_for(b, args.base_lr),
                                 base_lr=args.base_lr, seed=seed, samples=args.samples,
                                 wd=5e-4, measure=0, precise_samples=args.precise_samples))
    return jobs


PRECISE_BEGIN = ('<!-- small-batch-precise:begin '
                 '(tools/analysis_tools/small_batch_study.py --precise) -->')
PRECISE_END = '<!-- small-batch-precise:end -->'


def render_precise(results, args, wall, meta) -> str:
    lines = [f"Generated by `{meta['command']}` on {meta['when']} ({meta['machine']}); "
             f'wall time {wall / 60:.1f} min (load average at start {meta["load_start"]}).', '',
             f'SmallCNN on 4x4 digits, every norm swapped, {args.samples} training images '
             f'seen, base lr {args.base_lr} (linear scaling), {args.seeds} seeds (mean ± std). '
             'Test accuracy of the same trained weights with three sources of inference '
             'statistics: the running average of the batch statistics (BN\'s rule), of the '
             'pooled window statistics (CBN\'s default), and recomputed after training from '
             f'{args.precise_samples} training images at the training batch size with the '
             'weights fixed (`cbn_plugin.recompute_statistics`: every CBN layer pools k '
             'batches as in training; for BN this is PreciseBN).', '',
             '| norm | batch | from batch | from window | recomputed (precise) |',
             '|---|---|---|---|---|']
    for label in args.precise_norms:
        for b in args.precise_batches:
            rs = [r for r in results if r['cfg']['label'] == label and r['cfg']['batch'] == b]
            if not rs:
                continue
            window = rs[0]['cfg']['norm'].get('window', 1)
            name = display(label) + (f', k={window}' if is_cbn(label) else '')
            lines.append(f"| {name} | {b} | {_fmt([r['acc'] for r in rs])} | "
                         + (f"{_fmt([r['acc_window'] for r in rs])} | " if is_cbn(label)
                            else '- | ')
                         + f"{_fmt([r.get('acc_precise', float('nan')) for r in rs])} |")
    return '\n'.join(lines)


def precise_main(args, meta) -> list:
    jobs = build_precise_grid(args)
    print(f'{len(jobs)} runs, {args.workers} workers', flush=True)
    results, wall = run_jobs(jobs, args.workers, log=lambda s: print(s, flush=True),
                             cache=args.cache)
    meta['load_end'] = ' '.join(f'{v:.1f}' for v in os.getloadavg())
    (args.out_dir / 'small_batch_precise.json').write_text(json.dumps(
        dict(meta=meta, wall_s=wall, runs=results), indent=1, default=float) + '\n')
    block = render_precise(results, args, wall, meta)
    write_md(args.out_dir / 'small_batch_precise.md', block, PRECISE_BEGIN, PRECISE_END,
             intro='# Recomputed inference statistics at small batch\n\n'
                   'Whether statistics recomputed after training (PreciseBN for BN; every '
                   'CBN layer pooling its window of k batches, as training normalised with) '
                   'beat the running averages the layers keep. Everything between the '
                   'markers is written by the command it names.\n\n')
    print(block)
    return results


def main(argv=None):
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    load = lambda: ' '.join(f'{v:.1f}' for v in os.getloadavg())  # noqa: E731
    meta = dict(command='python tools/analysis_tools/small_batch_study.py ' + ' '.join(
        sys.argv[1:] if argv is None else argv),
        when=time.strftime('%Y-%m-%d %H:%M'), load_start=load(),
        machine=f'{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}')
    if args.precise:
        return precise_main(args, meta)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        meta, wall, results = saved['meta'], saved['wall_s'], saved['runs']
        for k, v in saved['args'].items():
            if k not in ('out_dir', 'from_json', 'cache'):
                setattr(args, k, v)
    else:
        jobs = build_grid(args)
        print(f'{len(jobs)} runs ({len({_key(j) for j in jobs})} distinct), '
              f'{args.workers} workers', flush=True)
        results, wall = run_jobs(jobs, args.workers, log=lambda s: print(s, flush=True),
                                 cache=args.cache)
        meta['load_end'] = load()
        (args.out_dir / 'small_batch.json').write_text(json.dumps(
            dict(meta=meta, args={k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(args).items()},
                 wall_s=wall, runs=results), indent=1, default=float) + '\n')
    block = render(results, args, wall, meta)
    plot_accuracy(results, args, args.out_dir / 'small_batch.png')
    plot_errors(results, args, args.out_dir / 'small_batch_errors.png')
    write_md(args.out_dir / 'small_batch.md', block)
    print(block)
    print(f'wall time {wall:.0f}s', flush=True)
    return results


if __name__ == '__main__':
    main()
