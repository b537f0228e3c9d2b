"""Precise inference statistics for CBN (and BN): recompute them with the weights fixed.

During training the weights move at every step, so the running averages a
norm layer keeps mix statistics of many different networks. PreciseBN
(fvcore/detectron2, pycls; MMPretrain's ``PreciseBNHook``; Wu & Johnson,
"Rethinking Batch in BatchNorm", 2021) runs N training batches through the
network with the weights fixed and sets the running statistics to the
average of what training normalised with.

For CBN, training did not normalise with one batch's statistics: with window
k each step normalised with the statistics of its own batch and the k-1
before it, each weighted equally (``functional.pool_window``). So
:func:`recompute_statistics` replays exactly that: every CBN layer
normalises batch t with the pooled statistics of batches t-k+1..t (the
weights are fixed, so the compensation is exactly zero and the pool is the
plain equal-weight pool: mean = mean of the batch means, variance = mean of
``var_i + (mean_i - mean)^2``), the layers after it see those outputs, and
the layer's estimate is the average over the full windows (t >= k-1) of the
pooled mean and of the pooled variance made unbiased as the layer's
``running_stats='window'`` does (``var * T / (T - 1)``, T = k times the
positions of a batch). Plain BN layers are the case k = 1 (fvcore's PreciseBN).
A CBN with ``per_call_windows=True`` (a head shared over FPN levels) keeps one
window per call position, as in training; a layer called several times per
forward without it pools its calls as consecutive batches (training merges
them into one slot per step: an approximation).

Why not MMPretrain's ``PreciseBNHook``: it runs the model under
``torch.no_grad()``, where a CBN layer is plain BN (the window is a training
path with gradient), and averages each batch's own statistics. For a CBN
with a window that is the k = 1 estimate: at batch 1-2 its variance is the
small within-batch variance, not the k-batch variance the layer normalised
with in training, and the layers after it are fed BN-normalised inputs.
``CBNHook`` therefore refuses a ``PreciseBNHook`` in a run with CBN windows
and names this hook.

Use::

    custom_hooks = [dict(type='CBNHook', burn_in_epochs=8),
                    dict(type='PreciseCBNHook', num_batches=200)]

or ``tools/precise_cbn.py CONFIG CHECKPOINT --num-batches 200`` on a trained
checkpoint, or :func:`recompute_statistics` on any model (a study's own
loop). SyncCBN/SyncBN layers pool each batch's statistics over the process
group (as in training); the estimates of the other layers are averaged over
the ranks (as MMPretrain's hook does).
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import pool_window
from .layer import CrossIterationBatchNorm2d
from .options import check_int
from .rng import get_rng_state, set_rng_state
from .sync_norms import is_sync_norm

__all__ = ['recompute_statistics', 'PreciseCBNHook', 'default_forward']


WINDOW_NONE = "or None: each CBN layer's window_size"


def _check_window(window, owner: str = '') -> None:
    """``window``: ``None`` (each layer's own) or an integer >= 1."""
    if window is not None:
        check_int('window', window, minimum=1, owner=owner, meaning=WINDOW_NONE)


def default_forward(model: nn.Module, batch) -> None:
    """One training forward of ``batch``: ``model(batch)`` for a tensor; for an
    MMEngine model ``model.data_preprocessor(batch, True)`` and ``mode='loss'``
    (the forward training ran, RoI sampling included)."""
    if isinstance(batch, torch.Tensor):
        model(batch)
        return
    preprocess = getattr(model, 'data_preprocessor', None)
    if preprocess is None:
        model(batch)
        return
    data = preprocess(batch, True)
    if isinstance(data, dict):
        model(**data, mode='loss')
    else:
        model(*data, mode='loss')


def _process_group(layer):
    """The group a synchronised norm reduces over in training; None otherwise."""
    import torch.distributed as dist
    if not (is_sync_norm(layer) and dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(layer, 'process_group', None)
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _Replay:
    """One layer's replay: normalises with the pooled window, accumulates the estimate."""

    def __init__(self, layer: _BatchNorm, window: int) -> None:
        self.layer, self.window = layer, window
        self.group = _process_group(layer)
        # (mean, var) per batch, float64; one window per call position when the
        # layer keeps one (per_call_windows, e.g. a head shared over FPN levels).
        self.per_call = bool(getattr(layer, 'per_call_windows', False))
        self.windows: dict[int, deque] = {}
        self.calls = 0
        self.sum_mean = self.sum_var = None
        self.estimates = 0

    def new_batch(self) -> None:
        self.calls = 0

    def __call__(self, module, args, output):
        x = args[0]
        if x.dim() < 2:
            raise ValueError(f'norm layer input of shape {tuple(x.shape)}: expected (N, C, ...)')
        dims = [0] + list(range(2, x.dim()))
        x64 = x.detach().double()
        count = x64.numel() // x64.shape[1]
        if self.group is None:
            mean = x64.mean(dims)
            var = ((x64 - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).mean(dims)
        else:  # the global batch, as SyncBN/SyncCBN normalised in training
            import torch.distributed as dist
            sums = torch.cat([x64.new_tensor([count]), x64.sum(dims)])
            dist.all_reduce(sums, group=self.group)
            count, mean = int(sums[0].item()), sums[1:] / sums[0]
            sq = ((x64 - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dims)
            dist.all_reduce(sq, group=self.group)
            var = sq / count
        past = self.windows.setdefault(self.calls if self.per_call else 0,
                                       deque(maxlen=self.window))
        self.calls += 1
        # The plain equal-weight pool of this batch and the ones before it (the
        # weights are fixed: nothing to compensate), as the layer pools in training.
        past.append((mean, var))
        earlier = list(past)[:-1]
        if earlier:
            mean_past = torch.stack([m for m, _ in earlier])
            var_past = torch.stack([v for _, v in earlier])
        else:
            mean_past = var_past = mean.new_zeros((0,) + tuple(mean.shape))
        pooled_mean, pooled_var, _ = pool_window(mean, var, mean_past, var_past,
                                                 torch.ones_like(mean_past, dtype=torch.bool))
        if len(past) == self.window:  # a full window: one estimate
            total = self.window * count
            unbiased = pooled_var * (total / max(total - 1, 1))
            if self.sum_mean is None:
                self.sum_mean, self.sum_var = torch.zeros_like(pooled_mean), \
                    torch.zeros_like(pooled_var)
            self.sum_mean += pooled_mean
            self.sum_var += unbiased
            self.estimates += 1
        layer = self.layer
        return F.batch_norm(x, pooled_mean.to(x.dtype), pooled_var.to(x.dtype), layer.weight,
                            layer.bias, False, 0.0, layer.eps)


@torch.no_grad()
def recompute_statistics(model: nn.Module, batches: Iterable, num_batches: int,
                         forward: Callable[[nn.Module, object], None] | None = None,
                         window: int | None = None) -> dict[str, dict]:
    """Set every training-mode BN/CBN layer's running statistics from ``num_batches`` batches.

    Args:
        model: the network (a DDP wrapper is unwrapped). Put into training mode
            for the pass (as training ran: dropout, RoI sampling), and back
            into its previous modes after. The layers recomputed are the
            ``_BatchNorm`` subclasses that are in training mode then and track
            running statistics (``norm_eval`` backbones stay as they are).
        batches: an iterable of batches (a train dataloader); the first
            ``num_batches`` are used.
        num_batches: N. Each layer gets ``N - k + 1`` estimates (its window k),
            so N must be at least the largest k.
        forward: ``forward(model, batch)`` runs one training forward;
            :func:`default_forward` by default.
        window: k for every CBN layer; default: each layer's ``window_size``
            (what training normalised with). BN layers always use 1.

    Returns ``{layer name: {'window': k, 'estimates': n, 'mean_change': ...,
    'var_change': ...}}`` (the largest relative change of the running mean /
    variance per layer). The parameters, the CBN windows and step counters,
    and every other buffer are left as they were; ``num_batches_tracked`` too.
    Raises ``ValueError`` for a bad ``num_batches``/``window`` or when the
    batches run out before N.
    """
    from mmengine.model import is_model_wrapper
    check_int('num_batches', num_batches, minimum=1)
    _check_window(window)
    forward = default_forward if forward is None else forward
    module = model.module if is_model_wrapper(model) else model
    modes = {m: m.training for m in module.modules()}
    module.train()
    try:
        layers = {name: m for name, m in module.named_modules()
                  if isinstance(m, _BatchNorm) and m.training and m.track_running_stats}
        if not layers:
            print_log('recompute_statistics: no BN/CBN layer in training mode; nothing to do',
                      logger='current', level=logging.WARNING)
            return {}
        replays = {name: _Replay(m, (window or m.window_size)
                                 if isinstance(m, CrossIterationBatchNorm2d) else 1)
                   for name, m in layers.items()}
        largest = max(r.window for r in replays.values())
        if num_batches < largest:
            raise ValueError(f'num_batches={num_batches} gives no full window to the CBN layers '
                             f'with window {largest}: use num_batches >= {largest} (a few '
                             'hundred in practice)')
        handles = [module.register_forward_pre_hook(
            lambda *_: [r.new_batch() for r in replays.values()] and None)]
        for name, layer in layers.items():
            layer.eval()  # its own forward reads the running statistics, writes nothing
            handles.append(layer.register_forward_hook(replays[name]))
        try:
            used = 0
            for batch in itertools.islice(batches, num_batches):
                forward(module, batch)
                used += 1
        finally:
            for handle in handles:
                handle.remove()
        if used < num_batches:
            raise ValueError(f'the batches ran out after {used} of num_batches={num_batches}')
        import torch.distributed as dist
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        report = {}
        for name, layer in layers.items():
            replay = replays[name]
            if replay.estimates == 0:
                raise RuntimeError(f'layer {name!r} was not run by the forward ({used} batches): '
                                   'its statistics cannot be recomputed')
            mean = replay.sum_mean / replay.estimates
            var = replay.sum_var / replay.estimates
            if world > 1 and replay.group is None:  # per-device layers: average the devices
                both = torch.cat([mean, var])
                dist.all_reduce(both)
                mean, var = (both / world).chunk(2)
            old_mean, old_var = layer.running_mean.clone(), layer.running_var.clone()
            layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
            layer.running_var.copy_(var.to(layer.running_var.dtype))
            scale = old_var.double().clamp_min(1e-12).sqrt()
            report[name] = dict(
                window=replay.window, estimates=replay.estimates,
                mean_change=float(((mean - old_mean.double()).abs() / scale).max()),
                var_change=float(((var - old_var.double()).abs()
                                  / old_var.double().clamp_min(1e-12)).max()))
        return report
    finally:
        for m, training in modes.items():
            m.train(training)


@HOOKS.register_module()
class PreciseCBNHook(Hook):
    """Recompute every BN/CBN layer's running statistics with the weights fixed.

    :func:`recompute_statistics` on ``num_batches`` batches of the train
    dataloader, every ``interval`` epochs (``EpochBasedTrainLoop``) or
    iterations (``IterBasedTrainLoop``); CBN layers pool their windows as
    training did (``window``: see :func:`recompute_statistics`). The RNG
    states of the process are put back afterwards, so training draws the
    same numbers as without the hook (except inside persistent data-loading
    workers). Priority ``'ABOVE_NORMAL'``: before ``CheckpointHook`` saves
    and before validation, like MMPretrain's ``PreciseBNHook``, which it
    replaces (and which ``CBNHook`` refuses with CBN windows).
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, num_batches: int = 200, interval: int = 1,
                 window: int | None = None) -> None:
        for name, value in dict(num_batches=num_batches, interval=interval).items():
            check_int(name, value, minimum=1, owner='PreciseCBNHook')
        _check_window(window, owner='PreciseCBNHook')
        self.num_batches, self.interval, self.window = num_batches, interval, window

    def _run(self, runner) -> None:
        loader = runner.train_dataloader
        num = self.num_batches
        if hasattr(loader, '__len__') and len(loader) < num:
            print_log(f'PreciseCBNHook: the train dataloader has {len(loader)} batches, fewer '
                      f'than num_batches={num}: using {len(loader)}', logger='current',
                      level=logging.WARNING)
            num = len(loader)
        state = get_rng_state()
        try:
            report = recompute_statistics(runner.model, loader, num, window=self.window)
        finally:
            set_rng_state(state)
        if report:
            worst = max(report.values(), key=lambda r: r['var_change'])
            print_log(f'PreciseCBNHook: recomputed the running statistics of {len(report)} '
                      f'norm layers from {num} batches (largest relative change of a running '
                      f'variance: {worst["var_change"]:.3g})', logger='current')

    def after_train_epoch(self, runner) -> None:
        from mmengine.runner import EpochBasedTrainLoop
        if isinstance(runner.train_loop, EpochBasedTrainLoop) and \
                self.every_n_epochs(runner, self.interval):
            self._run(runner)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        from mmengine.runner import IterBasedTrainLoop
        if isinstance(runner.train_loop, IterBasedTrainLoop) and \
                self.every_n_train_iters(runner, self.interval):
            self._run(runner)
