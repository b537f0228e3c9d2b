"""The Cross-Iteration BatchNorm layer: a thin ``_BatchNorm`` over ``functional``.

Subclassing ``_BatchNorm`` keeps everything that keys on BN working unchanged:
mmcv's ``'bn'`` abbreviation, ``norm_eval``, weight-decay rules, BN
checkpoints. A fresh layer's ``state_dict`` is exactly ``nn.BatchNorm2d``'s;
the window buffers appear once the layer has recorded a step, so a resumed
run restores them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as CF
from .window import StepRing

# Persistent window state, ``None`` (absent from the state_dict) until used.
# S call positions (1 unless ``per_call_windows``), k-1 past steps.
WINDOW_BUFFERS = (
    'num_steps',         # int64 scalar: optimizer steps seen
    'window_next',       # int64 S: ring slot the next step is written to
    'window_filled',     # int64 S: number of valid past steps
    'window_mean',       # S x (k-1) x C
    'window_var',        # S x (k-1) x C (biased)
    'window_grad_mean',  # S x (k-1) x groups x P'  (mean input patch)
    'window_grad_var',   # S x (k-1) x C x P'       (dvar/dW)
    'window_valid',      # bool S x (k-1): the slot holds a step with finite statistics
)
RUNNING_STATS_SOURCES = ('batch', 'window')
STATS_BACKWARD = ('current', 'pooled', 'compensated')
# Presets for the three choices where this plugin and the paper differ; an
# argument given explicitly overrides its preset. 'default' is what the
# small-batch study measured best (docs/small_batch.md); 'paper' is the
# algorithm of the paper and the authors' code (with their variance rule,
# variance_rule='exclude', it equals the authors' layer).
MODES = {
    'default': dict(stats_backward='compensated', running_stats='window', compensation='var'),
    'paper': dict(stats_backward='current', running_stats='batch', compensation='mu_nu'),
}


class PastEntries(NamedTuple):
    """The past entries one step pools at one call position, newest first (``J x C``).

    ``mean``/``var``: compensated to the current weights, variance rule
    applied; ``valid``: the entries pooled (the rule may drop some).
    """
    mean: Tensor
    var: Tensor
    valid: Tensor


class CrossIterationBatchNorm2d(_BatchNorm):
    """BatchNorm whose statistics pool the last ``window_size`` optimizer steps.

    Version 3 of its state adds ``window_valid``; older states are upgraded
    on load (every filled slot of an old window held a finite step).

    Args beyond ``nn.BatchNorm2d``'s:
        window_size: steps pooled, the current one included (k). 1 is BN.
        rho: weight of the Taylor compensation, 1.0 for CBN, 0.0 for naive
            averaging over steps. Must lie in [0, 1].
        mode: ``'default'`` or ``'paper'``: the preset for
            ``stats_backward``, ``running_stats`` and ``compensation`` (see
            ``MODES``); each of the three given explicitly overrides it.
        variance_rule: ``'clamp'`` (``max(nu, mu^2)`` per entry) or
            ``'exclude'`` (drop entries with ``nu < mu^2``, the authors' code).
        running_stats: what the running statistics used at inference track:
            ``'batch'`` (the current batch, as BN; the paper) or ``'window'``
            (the pooled window statistics; default).
        stats_backward: how the gradient treats the pooled statistics.
            ``'compensated'`` (default): the exact gradient of the forward;
            the compensated past entries are functions of the bound conv's
            current weight and bias and pass gradient to them.
            ``'current'`` (the paper, the authors' code): only this batch's
            statistics carry gradient, at weight 1/k; past entries are
            constants. ``'pooled'``: BN's backward as if the pooled statistics
            were this batch's (full weight).
        compensation: ``'var'`` (default): the first-order step on the mean
            and the variance; ``'mu_nu'`` (the paper): on the mean and the
            second moment, which also subtracts ``rho^2 d_mu^2`` from each
            past variance.
        dvar_stride: 1 computes ``dvar/dW`` exactly (one weight-gradient
            convolution per step); ``s > 1`` estimates it from one output
            position in ``s^2`` (every s-th row and column; every
            ``s^2``-th sample for batches of many small maps, such as RoI
            features), ``s^2`` times cheaper. The statistics themselves stay
            exact.
        per_call_windows: when the layer runs several times between two
            optimizer steps, ``False`` pools all calls of a step into that
            step's slot (gradient-accumulation micro-batches, darknet's CmBN);
            ``True`` keeps one window per call position (a head shared over
            FPN levels behaves like one CBN per level).

    A training step reads nothing back from the device (no ``.item()``,
    ``int(tensor)`` or branch on a tensor): the step counter and the ring's
    positions are mirrored on the host (``StepRing``), and a step whose
    statistics are not finite is masked out of the window on the device.

    Compensation needs the conv that produces the input: ``cbn_plugin.bind``
    (or the CBN hook) pairs them; ``cbn_plugin.step`` (or the hook) marks the
    end of each optimizer step.

    A single value per channel (batch 1 with 1x1 maps) cannot be normalised
    by its own statistics: with pooled statistics it trains like any batch;
    on a step whose window is still empty the layer normalises with its
    running statistics (as in eval mode), leaves them unchanged and only
    records the step; where it acts as plain BN (burn-in, ``window_size=1``)
    it raises.
    """

    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, window_size: int = 4,
                 rho: float = 1.0, variance_rule: str = 'clamp', mode: str = 'default',
                 running_stats: str | None = None, stats_backward: str | None = None,
                 compensation: str | None = None, dvar_stride: int = 1,
                 per_call_windows: bool = False, device=None, dtype=None) -> None:
        if mode not in MODES:
            raise ValueError(f'CBN mode must be one of {tuple(MODES)}, got {mode!r}')
        preset = MODES[mode]
        running_stats = preset['running_stats'] if running_stats is None else running_stats
        stats_backward = preset['stats_backward'] if stats_backward is None else stats_backward
        compensation = preset['compensation'] if compensation is None else compensation
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f'CBN window_size must be an integer >= 1 (1 is plain BN), '
                             f'got {window_size!r}')
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
            raise ValueError(f'CBN rho must be a number in [0, 1] (1 = CBN, 0 = naive CBN), '
                             f'got {rho!r}')
        if variance_rule not in CF.VARIANCE_RULES:
            raise ValueError(f'CBN variance_rule must be one of {CF.VARIANCE_RULES}, '
                             f'got {variance_rule!r}')
        if running_stats not in RUNNING_STATS_SOURCES:
            raise ValueError(f'CBN running_stats must be one of {RUNNING_STATS_SOURCES}, '
                             f'got {running_stats!r}')
        if stats_backward not in STATS_BACKWARD:
            raise ValueError(f'CBN stats_backward must be one of {STATS_BACKWARD}, '
                             f'got {stats_backward!r}')
        if compensation not in CF.COMPENSATIONS:
            raise ValueError(f'CBN compensation must be one of {CF.COMPENSATIONS}, '
                             f'got {compensation!r}')
        if isinstance(dvar_stride, bool) or not isinstance(dvar_stride, int) or dvar_stride < 1:
            raise ValueError(f'CBN dvar_stride must be an integer >= 1 (1 is exact), '
                             f'got {dvar_stride!r}')
        if not isinstance(per_call_windows, bool):
            raise ValueError(f'CBN per_call_windows must be True or False, got {per_call_windows!r}')
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f'CBN eps must be > 0, got {eps!r}')
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.window_size = window_size
        self.rho = float(rho)
        self.variance_rule = variance_rule
        self.running_stats = running_stats
        self.dvar_stride = dvar_stride
        self.stats_backward = stats_backward
        self.compensation = compensation
        self.per_call_windows = per_call_windows
        # Schedule, set by CBNHook from the config (set_schedule); the step
        # counter it is compared with is a (persistent) buffer, so resume
        # needs nothing else.
        self.burn_in_steps = 0
        self.ramp_steps = 0
        for name in WINDOW_BUFFERS:
            self.register_buffer(name, None)
        # Host mirrors of num_steps, num_batches_tracked and the ring positions.
        self._steps = 0
        self._batches = 0
        self.ring = StepRing(window_size - 1)
        self.diagnostics: dict[str, Tensor | int] = {'skipped_records': 0}
        self._bound = False
        self._reset_step_state()

    def set_schedule(self, burn_in_steps: int = 0, ramp_steps: int = 0) -> None:
        """Plain BN for the first ``burn_in_steps`` optimizer steps, then the window
        (all at once, or grown linearly over ``ramp_steps`` steps)."""
        for name, value in (('burn_in_steps', burn_in_steps), ('ramp_steps', ramp_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f'{self._describe()}: {name} must be an integer >= 0, '
                                 f'got {value!r}')
        self.burn_in_steps, self.ramp_steps = burn_in_steps, ramp_steps

    # ------------------------------------------------------------------ binding
    @property
    def compensates(self) -> bool:
        return self.window_size > 1 and self.rho != 0.0

    @property
    def bound_conv(self) -> torch.nn.Conv2d | None:
        return self.__dict__.get('_bound_conv')

    def attach(self, conv: torch.nn.Conv2d | None, name: str = '', conv_name: str = '') -> None:
        """Pair this layer with the conv producing its input (see ``cbn_plugin.bind``)."""
        handle = self.__dict__.pop('_conv_hook', None)
        if handle is not None:
            handle.remove()
        # A plain attribute, not a submodule: the conv belongs to its own parent
        # (no duplicate in state_dict or named_modules).
        object.__setattr__(self, '_bound_conv', conv)
        object.__setattr__(self, '_names', (name, conv_name))
        if conv is not None:
            object.__setattr__(self, '_conv_hook', conv.register_forward_hook(self._capture_conv_io))
        self._bound = True

    def _capture_conv_io(self, conv, args, output) -> None:
        if self.training and self.compensates and torch.is_grad_enabled():
            self._conv_io = (args[0], output)

    # ------------------------------------------------------------------ steps
    def _reset_step_state(self) -> None:
        self._conv_io = None
        self._call_index = 0
        self._past = {}      # position -> PastEntries for this step
        self._compensated = {}  # position -> (ring index used, compensated ring mean, var)
        self._pending = {}   # position -> (this step's record so far, whether it is finite)

    def step(self) -> None:
        """Mark the end of an optimizer step: this step's record joins the window.

        Records are written here, not in the forward: until the backward has
        run, the graph of a compensated backward reads the oldest slot, the one
        this step's record replaces.
        """
        if self.num_steps is None:
            self.num_steps = torch.zeros((), dtype=torch.long, device=self._state_device())
        self.num_steps += 1
        self._steps += 1
        if self.window_size > 1:
            for position, (record, finite) in self._pending.items():
                self._write_record(position, record, finite)
                self.ring.advance(position)
                # Python ints written into the buffers: no read back.
                self.window_next[position] = self.ring.next[position]
                self.window_filled[position] = self.ring.filled[position]
        self._reset_step_state()

    def discard_step(self) -> None:
        """Forget this step's forward calls without recording them.

        For a forward repeated within one optimizer step as if it were the step's
        first (gradcheck, a probe): the window is left as it is.
        """
        self._reset_step_state()

    def past_entries(self, position: int = 0) -> PastEntries | None:
        """The past entries this step pools at call ``position``; ``None`` before its first call."""
        return self._past.get(position)

    @property
    def steps_done(self) -> int:
        """Optimizer steps seen (the host mirror of ``num_steps``)."""
        return self._steps

    def _state_device(self) -> torch.device:
        for t in (self.running_mean, self.weight):
            if t is not None:
                return t.device
        return torch.device('cpu')

    # ------------------------------------------------------------------ forward
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f'CBN expects a 4D (N, C, H, W) input, got {input.dim()}D')

    def _window_in_use(self) -> bool:
        if not (self.training and self.window_size > 1 and torch.is_grad_enabled()):
            return False
        if not self._bound:
            raise RuntimeError(
                f'{self._describe()} has window_size={self.window_size} but was never bound: '
                'call cbn_plugin.bind(model) before training and cbn_plugin.step(model) after '
                "each optimizer step, or add dict(type='CBNHook') to custom_hooks")
        conv = self.bound_conv
        # A frozen conv never changes, and BN is what a frozen layer should be.
        return conv is None or conv.weight.requires_grad

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        conv_io, self._conv_io = self._conv_io, None
        if not self._window_in_use():
            return self._batch_norm(x)
        step = self.steps_done
        if step < CF.recording_starts(self.window_size, self.burn_in_steps):
            return self._batch_norm(x)
        position = self._call_index if self.per_call_windows else 0
        window = CF.active_window(step, self.window_size, self.burn_in_steps, self.ramp_steps)

        group = self._group()
        current = self._current(x, conv_io, derivatives=self.compensates, group=group)
        mean_cur, var_cur, count = current.mean, current.var, current.count
        finite = CF.all_finite(current)
        if position not in self._past:
            self._past[position] = self._compensated_past(position, window - 1)
        mean_past, var_past, valid = self._past[position]
        pending, pending_finite = self._pending.get(position, (None, None))
        exact = self.stats_backward == 'compensated' and self.compensates
        if pending is None and mean_past.shape[0] == 0 and group is None:
            if count == 1 and window > 1:
                out = self._seed_window(x)  # one value per channel, nothing to pool yet
            else:
                out = self._batch_norm(x)  # nothing to pool yet: exactly BN
        else:
            if exact and mean_past.shape[0] > 0:
                mean_past, var_past = self._past_with_gradient(position)
            mean_step, var_step, share = mean_cur, var_cur, 1.0
            if pending is not None:
                # Earlier calls of this step: same weights, so merged exactly.
                # This call's share is differentiated analytically; the earlier
                # calls' statistics, with the compensated backward, through
                # their derivatives in the conv weight.
                earlier = pending
                if exact:
                    mean_earlier, var_earlier = self._earlier_with_gradient(pending)
                    earlier = pending._replace(mean=mean_earlier, var=var_earlier)
                this_call = CF.SlotStats(count, mean_cur, var_cur, None, None)
                merged = CF.merge_stats(earlier._replace(grad_mean=None, grad_var=None), this_call)
                # Earlier calls whose statistics were not finite are not pooled.
                merged = CF.select_stats(pending_finite, merged, this_call)
                mean_step, var_step, share = merged.mean, merged.var, count / merged.count
            mean, var, pooled = CF.pool_window(mean_step, var_step, mean_past, var_past, valid)
            self._update_running_stats(mean_step.detach(), var_step.detach(), count,
                                       mean.detach(), var.detach(), pooled)
            if self.stats_backward == 'pooled':  # BN's backward, as if pooled were this batch's
                mean_call, stat_weight = mean.detach(), torch.ones_like(mean)
            else:
                mean_call, stat_weight = mean_cur, share / pooled
            out = CF.pooled_batch_norm(x, mean, var, mean_call, stat_weight, self.weight,
                                       self.bias, self.eps, count, group)
        # Only a forward that succeeded changes the window (at the next step()).
        self._call_index += 1
        if pending is None:
            self._pending[position] = (current, finite)
        else:  # on the device: a call whose statistics are not finite is left out
            merged = CF.select_stats(pending_finite, CF.merge_stats(pending, current), current)
            self._pending[position] = (CF.select_stats(finite, merged, pending),
                                       finite | pending_finite)
        self.diagnostics['skipped_records'] = (self.diagnostics['skipped_records']
                                               + (~finite).long())
        self.diagnostics['window'] = 1 + mean_past.shape[0]
        return out

    def _past_with_gradient(self, position: int) -> tuple[Tensor, Tensor]:
        """This step's past entries as functions of the bound conv's weight and bias."""
        slots, ring_mean, ring_var = self._compensated[position]
        conv = self.bound_conv
        mean, var = CF.compensated_entries(
            ring_mean, ring_var, self.window_mean[position], self.window_grad_mean[position],
            self.window_grad_var[position], conv.weight, conv.bias, self.rho, self.compensation)
        mean, var = mean[slots], var[slots]
        var, _, _ = CF.apply_variance_rule(mean, var, self.variance_rule)
        return mean, var

    def _earlier_with_gradient(self, pending: CF.SlotStats) -> tuple[Tensor, Tensor]:
        """The statistics of this step's earlier calls, differentiable in the conv weight."""
        conv = self.bound_conv
        mean, var = CF.compensated_entries(
            pending.mean[None], pending.var[None], pending.mean[None], pending.grad_mean[None],
            pending.grad_var[None], conv.weight, conv.bias, 1.0, self.compensation)
        return mean[0], var[0]

    def _seed_window(self, x: Tensor) -> Tensor:
        """One value per channel and an empty window: running statistics, window seeded."""
        if not self.track_running_stats:
            raise ValueError(
                f'{self._describe()} got one value per channel (input {tuple(x.shape)}) and '
                'has no past steps to pool yet nor running statistics to fall back on: use '
                'track_running_stats=True, or a batch with more than one value per channel')
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    def _batch_norm(self, x: Tensor) -> Tensor:
        """Plain BN, except that non-finite batch statistics never reach the running ones."""
        if self.training and x.numel() == x.shape[1]:
            raise ValueError(
                f'{self._describe()} got one value per channel (input {tuple(x.shape)}) while '
                f'acting as plain BN (burn-in, window_size=1, a frozen conv or a no_grad '
                f'forward), and BN cannot normalise a single value: use a window '
                f'(window_size > 1, no burn-in) or more than one value per channel')
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        factor = self._momentum_factor()
        # BN updates the running statistics it is given in place and autograd
        # saves them: give it copies, and commit the finite channels afterwards.
        mean, var = self.running_mean.clone(), self.running_var.clone()
        out = F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)
        self._commit_running_stats(mean, var)
        return out

    def _momentum_factor(self) -> float:
        """BN's bookkeeping: count the batch, return the running-average factor."""
        self.num_batches_tracked.add_(1)
        self._batches += 1
        if self.momentum is None:  # cumulative moving average (the host mirror: no read)
            return 1.0 / self._batches
        return self.momentum

    def _commit_running_stats(self, mean: Tensor, var: Tensor) -> None:
        # Per channel and without a host sync: a channel whose update is not
        # finite keeps its previous value.
        with torch.no_grad():
            for buffer, new in ((self.running_mean, mean), (self.running_var, var)):
                buffer.copy_(torch.where(torch.isfinite(new), new, buffer))

    def _group(self):
        """The process group the statistics are reduced over; None for CBN."""
        return None

    def _current(self, x: Tensor, conv_io, derivatives: bool, group=None) -> CF.SlotStats:
        """This call's statistics, and their derivatives w.r.t. the conv weight."""
        grads = (None, None)
        with torch.no_grad():  # the gradient through the statistics is analytic
            mean, var = CF.batch_stats(x)
            if derivatives:
                self._check_conv_io(x, conv_io)
                grads = CF.conv_stat_grads(conv_io[0], x, mean, var, self.bound_conv,
                                           self.dvar_stride)
        return CF.SlotStats(x.numel() // x.shape[1], mean, var, *grads)

    def _check_conv_io(self, x: Tensor, conv_io) -> None:
        if conv_io is None or conv_io[1] is not x:
            conv_name = self.__dict__.get('_names', ('', ''))[1]
            raise RuntimeError(
                f'{self._describe()} is bound to conv {conv_name!r} but its input is not '
                "that conv's output: the conv must feed the norm directly (bind pairs "
                'conv -> norm; pass pairs= for other layouts, or use rho=0)')

    # ------------------------------------------------------------------ window
    def _compensated_past(self, position: int, max_ages: int):
        """Past entries moved to the current weights: ``(mean, var, valid)``, ``J x C``.

        Computed once per step and position: the weights do not change within a
        step (records join the window only at ``step()``).
        """
        c = self.num_features
        ages = self.ring.ages(position, max_ages)
        if ages == 0:
            empty = torch.zeros(0, c, device=self._state_device())
            return PastEntries(empty, empty, empty.bool())
        # Compensate every slot in place (views, no copy of the |W|-sized
        # derivatives), then pick the used ones, newest first: J x C is small.
        idx = self.ring.index(position, ages, self.window_mean.device)
        mean_old = self.window_mean[position]
        var_old = self.window_var[position]
        grad_mean = grad_var = weight = bias = None
        if self.compensates:
            conv = self.bound_conv
            grad_mean = self.window_grad_mean[position]
            grad_var = self.window_grad_var[position]
            weight, bias = conv.weight, conv.bias
        with torch.no_grad():
            mean, var = CF.compensate(mean_old, var_old, grad_mean, grad_var, weight, bias,
                                      self.rho, self.compensation)
            self._compensated[position] = (idx, mean, var)
            mean, var, mean_old, var_old = (t[idx] for t in (mean, var, mean_old, var_old))
            var, valid, negative = CF.apply_variance_rule(mean, var, self.variance_rule)
            # A step whose statistics were not finite holds zeros: never pooled.
            valid = valid & self.window_valid[position][idx].unsqueeze(1)
        self.diagnostics.update(
            negative_fraction=negative.float().mean(),
            mean_shift=((mean - mean_old).abs() / (var_old + self.eps).sqrt()).mean())
        return PastEntries(mean, var, valid)

    def _allocate(self, positions: int, record: CF.SlotStats) -> None:
        k1, c = self.ring.slots, self.num_features
        like = record.mean
        shapes = {'window_mean': (c,), 'window_var': (c,)}
        if record.grad_mean is not None:
            shapes['window_grad_mean'] = tuple(record.grad_mean.shape)
            shapes['window_grad_var'] = tuple(record.grad_var.shape)
        old = self.window_mean.shape[0] if self.window_mean is not None else 0
        for name, shape in shapes.items():
            fresh = like.new_zeros((positions - old, k1) + shape)
            current = getattr(self, name)
            setattr(self, name, fresh if current is None else torch.cat([current, fresh]))
        for name, shape, dtype in (('window_next', (), torch.long),
                                   ('window_filled', (), torch.long),
                                   ('window_valid', (k1,), torch.bool)):
            fresh = torch.zeros((positions - old,) + shape, dtype=dtype, device=like.device)
            current = getattr(self, name)
            setattr(self, name, fresh if current is None else torch.cat([current, fresh]))
        self.ring.grow(positions)

    def _write_record(self, position: int, record: CF.SlotStats, finite: Tensor) -> None:
        """Write a step's record into the slot of its oldest step (see ``step``).

        A record that is not finite is written as zeros and marked invalid: on
        the device, in the same single pass as a copy.
        """
        if self.window_mean is None or position >= self.window_mean.shape[0]:
            self._allocate(position + 1, record)
        slot = self.ring.next[position]
        fields = [('window_mean', record.mean), ('window_var', record.var)]
        if record.grad_mean is not None:
            fields += [('window_grad_mean', record.grad_mean),
                       ('window_grad_var', record.grad_var)]
        zero = record.mean.new_zeros(())
        for name, value in fields:
            torch.where(finite, value, zero, out=getattr(self, name)[position, slot])
        self.window_valid[position, slot] = finite

    def _update_running_stats(self, mean_cur: Tensor, var_cur: Tensor, count: int,
                              mean: Tensor, var: Tensor, pooled: Tensor) -> None:
        """BN's running-statistics update, from the batch or from the window."""
        if not self.track_running_stats:
            return
        factor = self._momentum_factor()
        if self.running_stats == 'batch':
            # count: an int, or SyncCBN's global count as a tensor (never read)
            unbias = count / (count - 1) if isinstance(count, Tensor) or count > 1 else 1.0
            mean, var = mean_cur, var_cur * unbias
        else:
            total = pooled * count
            var = var * total / (total - 1).clamp_min(1)
        dtype = self.running_mean.dtype
        self._commit_running_stats(torch.lerp(self.running_mean, mean.to(dtype), factor),
                                   torch.lerp(self.running_var, var.to(dtype), factor))

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Window buffers have data-dependent shapes: take them from the
        # checkpoint. A checkpoint without window state (a BN checkpoint, or one
        # from before the first step) resets the window: statistics of other
        # weights cannot be compensated to the loaded ones.
        # The host mirrors: the one time they are read from tensors.
        steps = state_dict.get(prefix + 'num_steps')
        batches = state_dict.get(prefix + 'num_batches_tracked')
        filled = state_dict.get(prefix + 'window_filled')
        self._steps = int(steps) if isinstance(steps, Tensor) else 0
        self._batches = int(batches) if isinstance(batches, Tensor) else 0
        self.ring.load(state_dict.get(prefix + 'window_next'), filled)
        if isinstance(filled, Tensor) and prefix + 'window_valid' not in state_dict:
            version = local_metadata.get('version')
            if version is None or version < 3:
                # Version 2 kept only finite steps: every filled slot is valid.
                state_dict[prefix + 'window_valid'] = self.ring.filled_mask(
                    self.ring.positions, filled.device)
            else:
                error_msgs.append(f'{prefix}window_valid is missing from a version-{version} '
                                  'CBN state that has a window (a damaged or hand-edited '
                                  'state_dict)')
        for name in WINDOW_BUFFERS:
            incoming = state_dict.get(prefix + name)
            if incoming is None:
                setattr(self, name, None)
            elif isinstance(incoming, Tensor):
                setattr(self, name, torch.empty_like(incoming, device=self._state_device()))
        self._reset_step_state()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def window_numel(self) -> int:
        """Numbers held by the window buffers (the memory the window costs)."""
        names = ('window_mean', 'window_var', 'window_grad_mean', 'window_grad_var')
        return sum(getattr(self, n).numel() for n in names if getattr(self, n) is not None)

    def past_slots(self, position: int = 0) -> tuple[int, ...]:
        """The ring slots this step pools at ``position``, newest first (row j of
        ``past_entries(position)`` is slot ``past_slots(position)[j]``)."""
        entries = self._past.get(position)
        ages = 0 if entries is None else entries.mean.shape[0]
        return self.ring.newest_first(position, ages) if ages else ()

    def _describe(self) -> str:
        name = self.__dict__.get('_names', ('', ''))[0]
        return f'CBN layer {name!r}' if name else f'CBN layer ({self.num_features} channels)'

    def extra_repr(self) -> str:
        return (super().extra_repr() + f', window_size={self.window_size}, rho={self.rho}, '
                f'variance_rule={self.variance_rule!r}, running_stats={self.running_stats!r}, '
                f'stats_backward={self.stats_backward!r}, compensation={self.compensation!r}, '
                f'dvar_stride={self.dvar_stride}, per_call_windows={self.per_call_windows}')


class SyncCrossIterationBatchNorm2d(CrossIterationBatchNorm2d):
    """CBN whose statistics are pooled across devices *and* across steps.

    Per forward, one all-reduce of ``1 + 2C`` numbers (``1 + 2C + P + |W|``
    when it compensates: the patch sum and ``sum (x - s) p``, which are
    linear and so reduce exactly) gives every device the statistics and
    derivatives of the global batch; the window then holds global entries and
    is identical everywhere. The backward all-reduces ``2C`` numbers, as
    SyncBN's does. Without an initialised process group (or in a world of
    one) it behaves as CBN, with a one-time warning, like mmengine's SyncBN.
    """

    def __init__(self, num_features: int, *args, process_group=None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        if self.dvar_stride != 1:
            raise ValueError(f'SyncCBN supports only exact derivatives (dvar_stride=1), got '
                             f'dvar_stride={self.dvar_stride}')
        self.process_group = process_group
        self._warned = False
        self._shift = None

    @property
    def stats_shift(self) -> Tensor | None:
        """The shift of the all-reduced sums: the previous global mean (``None`` before
        the first synchronised forward). Rank-local state that a checkpoint must carry
        for a bit-exact resume (``cbn_plugin.engine`` does)."""
        return self._shift

    @stats_shift.setter
    def stats_shift(self, value: Tensor | None) -> None:
        if value is not None and tuple(value.shape) != (self.num_features,):
            raise ValueError(f'{self._describe()}: stats_shift must have shape '
                             f'({self.num_features},), got {tuple(value.shape)}')
        self._shift = value

    def _group(self):
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() \
                and dist.get_world_size(self.process_group) > 1:
            return self.process_group if self.process_group is not None else dist.group.WORLD
        if not self._warned:
            import warnings
            warnings.warn('SyncCBN: no initialised process group with more than one process; '
                          'the statistics are this process\'s own, as in CBN', stacklevel=3)
            self._warned = True
        return None

    def _current(self, x: Tensor, conv_io, derivatives: bool, group=None) -> CF.SlotStats:
        if group is None:
            return super()._current(x, conv_io, derivatives)
        import torch.distributed as dist
        conv = None
        if derivatives:
            self._check_conv_io(x, conv_io)
            conv = self.bound_conv
        # The shift must be the same on every device, and near the mean: the
        # previous global mean is both by construction (zeros before the first).
        shift = self._shift
        if shift is None or shift.shape[0] != self.num_features:
            shift = torch.zeros(self.num_features, dtype=CF.stats_dtype(x), device=x.device)
        with torch.no_grad():
            sums = CF.shifted_sums(x, shift, conv_io[0] if conv is not None else None, conv)
            dist.all_reduce(sums, group=group)
            current = CF.stats_from_sums(sums, shift, conv.groups if conv is not None else 1)
        # Per channel and without a host sync (forward checks the whole record).
        self._shift = torch.where(torch.isfinite(current.mean), current.mean, shift)
        return current

    def _batch_norm(self, x: Tensor) -> Tensor:
        """SyncBN: burn-in, window 1, frozen convs and no_grad forwards in training."""
        group = self._group() if self.training else None
        if group is None:
            return super()._batch_norm(x)
        current = self._current(x, None, derivatives=False, group=group)
        ones = torch.ones_like(current.mean)
        self._update_running_stats(current.mean, current.var, current.count, current.mean,
                                   current.var, ones)
        return CF.pooled_batch_norm(x, current.mean, current.var, current.mean, ones,
                                    self.weight, self.bias, self.eps, current.count, group)
