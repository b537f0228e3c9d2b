"""Why a norm does what it does: the statistics-error analysis and the gradient comparison.

``NormProbe`` hooks every CBN layer of a model without changing what it computes and compares,
at chosen steps, the statistics the layer pooled with the window's true statistics (its old
raw batches pushed through the current network); ``gradient_fidelity`` compares each of the
layer's backwards with large-batch BN's gradient.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cbn_plugin
from cbn_plugin import functional as CF

from .models import EPS


def _rms(t):
    return float(t.pow(2).mean().sqrt())


def _mean_err(mean, ref_mean, ref_var):
    """RMS over channels of the mean error in units of the reference std."""
    return _rms((mean - ref_mean) / (ref_var + EPS).sqrt())


def _std_err(var, ref_var):
    """RMS over channels of log(sigma / sigma_ref) (about the relative error of the std)."""
    return _rms(0.5 * torch.log((var.clamp_min(0) + EPS) / (ref_var + EPS)))


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
            idx = torch.tensor(layer.past_slots(0), dtype=torch.long)  # past_entries' rows
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
            layer.set_schedule(*schedule[n])
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
