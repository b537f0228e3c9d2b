"""The Cross-Iteration BatchNorm layer: a thin ``_BatchNorm`` over ``functional``.

Subclassing ``_BatchNorm`` keeps everything that keys on BN working unchanged:
mmcv's ``'bn'`` abbreviation, ``norm_eval``, weight-decay rules, BN
checkpoints. A fresh layer's ``state_dict`` is exactly ``nn.BatchNorm2d``'s;
the window buffers appear once the layer has recorded a step, so a resumed
run restores them. The window's layout and ring live in ``window.py``, the
maths in ``functional.py``, the options in ``options.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as CF
from .options import (COMPENSATIONS, MODES, RUNNING_STATS_SOURCES, STATS_BACKWARD,  # noqa: F401
                      VARIANCE_RULES, check_bool, check_choice, check_int, check_number,
                      resolve_mode)
from .window import (WINDOW_BUFFERS, CrossIterationWindow, PastEntries,  # noqa: F401
                     StepCall)


class Binding(NamedTuple):
    """The conv a layer is paired with (a reference: the conv belongs to its own parent)."""
    conv: torch.nn.Conv2d | None
    hook: object | None        # the conv's forward hook handle
    layer_name: str
    conv_name: str


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
            ``options.MODES``); each of the three given explicitly overrides it.
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
            position in ``s^2``, ``s^2`` times cheaper. The statistics
            themselves stay exact.
        per_call_windows: when the layer runs several times between two
            optimizer steps, ``False`` pools all calls of a step into that
            step's slot (gradient-accumulation micro-batches, darknet's CmBN);
            ``True`` keeps one window per call position (a head shared over
            FPN levels behaves like one CBN per level).

    A training step reads nothing back from the device (no ``.item()``,
    ``int(tensor)`` or branch on a tensor) and its forward reads no ring
    position: every slot is pooled under a mask kept on the device.

    Compensation needs the conv that produces the input: ``cbn_plugin.bind``
    (or the CBN hook) pairs them; ``cbn_plugin.step`` (or the hook) marks the
    end of each optimizer step.

    A single value per channel (batch 1 with 1x1 maps) cannot be normalised
    by its own statistics: with pooled statistics it trains like any batch;
    on a step whose window is still empty the layer normalises with its
    running statistics (as in eval mode), leaves them unchanged and only
    records the step; where it acts as plain BN (burn-in, ``window_size=1``)
    it raises. An empty batch (no positions: a RoI head without RoIs) gives
    an empty output and changes no statistics, as BN does.
    """

    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, window_size: int = 4,
                 rho: float = 1.0, variance_rule: str = 'clamp', mode: str = 'default',
                 running_stats: str | None = None, stats_backward: str | None = None,
                 compensation: str | None = None, dvar_stride: int = 1,
                 per_call_windows: bool = False, device=None, dtype=None) -> None:
        choices = resolve_mode(mode, 'CBN', running_stats=running_stats,
                               stats_backward=stats_backward, compensation=compensation)
        check_int('window_size', window_size, 1, 'CBN', '1 is plain BN')
        check_number('rho', rho, 0.0, 1.0, 'CBN', '1 = CBN, 0 = naive CBN')
        check_choice('variance_rule', variance_rule, VARIANCE_RULES, 'CBN')
        check_choice('running_stats', choices['running_stats'], RUNNING_STATS_SOURCES, 'CBN')
        check_choice('stats_backward', choices['stats_backward'], STATS_BACKWARD, 'CBN')
        check_choice('compensation', choices['compensation'], COMPENSATIONS, 'CBN')
        check_int('dvar_stride', dvar_stride, 1, 'CBN', '1 is exact')
        check_bool('per_call_windows', per_call_windows, 'CBN')
        check_number('eps', eps, 0.0, owner='CBN', open_low=True)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.window_size = window_size
        self.rho = float(rho)
        self.variance_rule = variance_rule
        self.running_stats = choices['running_stats']
        self.stats_backward = choices['stats_backward']
        self.compensation = choices['compensation']
        self.dvar_stride = dvar_stride
        self.per_call_windows = per_call_windows
        # Schedule, set by CBNHook from the config (set_schedule); the step
        # counter it is compared with is a (persistent) buffer, so resume
        # needs nothing else.
        self._schedule = (0, 0)  # (burn-in steps, ramp steps)
        for name in WINDOW_BUFFERS:
            self.register_buffer(name, None)
        self.window = CrossIterationWindow(self._buffers, window_size - 1)
        # Host mirrors of num_steps and num_batches_tracked.
        self._steps = 0
        self._batches = 0
        # The bound conv (see attach), held in a tuple: never a submodule of this
        # layer (no duplicate in state_dict or named_modules).
        self._binding: Binding | None = None
        # Window figures (diagnostics) cost a few ops per step: computed only
        # while this is set (CBNHook sets it on the iterations it logs).
        self.track_diagnostics = False
        self._reset_step_state()
        self._refresh_phase()

    def set_schedule(self, burn_in_steps: int = 0, ramp_steps: int = 0) -> None:
        """Plain BN for the first ``burn_in_steps`` optimizer steps, then the window
        (all at once, or grown linearly over ``ramp_steps`` steps)."""
        check_int('burn_in_steps', burn_in_steps, 0, self._describe() + ':')
        check_int('ramp_steps', ramp_steps, 0, self._describe() + ':')
        self._schedule = (burn_in_steps, ramp_steps)
        self._refresh_phase()

    @property
    def burn_in_steps(self) -> int:
        return self._schedule[0]

    @burn_in_steps.setter
    def burn_in_steps(self, value: int) -> None:
        self.set_schedule(value, self._schedule[1])

    @property
    def ramp_steps(self) -> int:
        return self._schedule[1]

    @ramp_steps.setter
    def ramp_steps(self, value: int) -> None:
        self.set_schedule(self._schedule[0], value)

    def _refresh_phase(self) -> None:
        """What the forward branches on, on the host: the steps pooled now, 0 while
        the layer is plain BN (burn-in before recording starts).

        It changes a bounded number of times (burn-in, ramp, full window), never
        with the step count itself: a compiled model compiles a bounded number
        of graphs however long it trains.
        """
        recording = self._steps >= CF.recording_starts(self.window_size, self.burn_in_steps)
        self._window_now = self._active_window() if recording else 0

    # ------------------------------------------------------------------ binding
    @property
    def compensates(self) -> bool:
        return self.window_size > 1 and self.rho != 0.0

    @property
    def bound_conv(self) -> torch.nn.Conv2d | None:
        return None if self._binding is None else self._binding.conv

    def attach(self, conv: torch.nn.Conv2d | None, name: str = '', conv_name: str = '') -> None:
        """Pair this layer with the conv producing its input (see ``cbn_plugin.bind``)."""
        if self._binding is not None and self._binding.hook is not None:
            self._binding.hook.remove()
        hook = None if conv is None else conv.register_forward_hook(self._capture_conv_io)
        self._binding = Binding(conv, hook, name, conv_name)

    def _capture_conv_io(self, conv, args, output) -> None:
        if self.training and self.compensates and torch.is_grad_enabled():
            self._conv_io = (args[0], output)

    # ------------------------------------------------------------------ steps
    def _reset_step_state(self) -> None:
        self._conv_io = None
        self._call_index = 0

    def step(self) -> None:
        """Mark the end of an optimizer step: this step's records join the window."""
        if self.num_steps is None:
            self.num_steps = torch.zeros((), dtype=torch.long, device=self._state_device())
        self.num_steps.add_(1)
        self._steps += 1
        self._refresh_phase()
        self.window.commit(write=self.window_size > 1)
        self._reset_step_state()

    def discard_step(self) -> None:
        """Forget this step's forward calls without recording them.

        For a forward repeated within one optimizer step as if it were the step's
        first (gradcheck, a probe): the window is left as it is.
        """
        self.window.discard()
        self._reset_step_state()

    def past_entries(self, position: int = 0) -> PastEntries | None:
        """The past entries this step pools at call ``position``, newest first;
        ``None`` before its first call."""
        return self.window.past_entries(position, self._active_window() - 1,
                                        self.variance_rule)

    def past_slots(self, position: int = 0) -> tuple[int, ...]:
        """The ring slots this step pools at ``position``, newest first (row j of
        ``past_entries(position)`` is slot ``past_slots(position)[j]``)."""
        return self.window.past_slots(position, self._active_window() - 1)

    @property
    def diagnostics(self) -> dict:
        """The window figures of the latest forward (this step's, else the last step's),
        read when asked, never in a step.

        ``window``: steps pooled; ``skipped_records``: calls whose statistics
        were not finite (left out of the window); while ``track_diagnostics``
        is set and the layer compensates, ``mean_shift`` and
        ``negative_fraction`` (``functional.window_shift``), 0-dim tensors.
        """
        found = {'skipped_records': self.window.skipped_records()}
        calls = self.window.calls or self.window.last_calls
        if calls:
            found['window'] = max(call.window for call in calls.values())
        shifts = [call.shift for call in calls.values() if call.shift is not None]
        if shifts and self.compensates:
            found['mean_shift'], found['negative_fraction'] = shifts[0]
        return found

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
        if self._binding is None:
            raise RuntimeError(
                f'{self._describe()} has window_size={self.window_size} but was never bound: '
                'call cbn_plugin.bind(model) before training and cbn_plugin.step(model) after '
                "each optimizer step, or add dict(type='CBNHook') to custom_hooks")
        conv = self._binding.conv
        # A frozen conv never changes, and BN is what a frozen layer should be.
        return conv is None or conv.weight.requires_grad

    def _active_window(self, step: int | None = None) -> int:
        step = self._steps if step is None else step
        return CF.active_window(step, self.window_size, self.burn_in_steps, self.ramp_steps)

    def forward(self, x: Tensor) -> Tensor:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return self._traced_forward(x)
        self._check_input_dim(x)
        conv_io, self._conv_io = self._conv_io, None
        if not self._window_in_use() or self._window_now == 0:
            return self._batch_norm(x)
        group = self._group()
        if x.shape[0] == 0 and group is None:
            return self._empty(x)
        position = self._call_index if self.per_call_windows else 0
        window = self._window_now
        # 1. this call's statistics (and their derivatives in the conv weight)
        current = self._current(x, conv_io, derivatives=self.compensates, group=group)
        count = current.count
        ages = self.window.ages(position, window - 1)
        if position not in self.window.calls and ages == 0 and group is None:
            # Nothing to pool yet: exactly BN (one value per channel: the running statistics).
            out = self._seed_window(x) if count == 1 and window > 1 else self._batch_norm(x)
            self.window.keep(position, StepCall(current, None, None, 1, None))
            self._call_index += 1
            return out
        # 2. the step's statistics: this call merged with the step's earlier calls
        step_stats, record, finite, share, earlier, skips = self.window.merge(position, current)
        # 3. the past entries, compensated, pooled with the step's
        entries = self.window.entries(position, window - 1, current)
        exact = self.stats_backward == 'compensated' and self.compensates
        conv = self.bound_conv
        pooled = CF.pool_compensated(
            step_stats.mean, step_stats.var, entries,
            None if conv is None else conv.weight, None if conv is None else conv.bias,
            self.rho if self.compensates else 0.0, self.compensation, self.variance_rule,
            differentiable=exact, earlier=earlier if exact else None)
        self._update_running_stats(step_stats, count, pooled)
        # 4. normalise; the gradient reaches x through this call's statistics
        if self.stats_backward == 'pooled':  # BN's backward, as if pooled were this batch's
            stat_weight = torch.ones_like(pooled.mean)
        else:
            stat_weight = (pooled.count.reciprocal() if isinstance(share, float) and share == 1.0
                           else share / pooled.count)
        out = CF.pooled_batch_norm(x, pooled.mean, pooled.var, stat_weight, self.weight,
                                   self.bias, self.eps, count, group)
        shift = None
        if self.track_diagnostics:
            with torch.no_grad():
                shift = CF.window_shift(entries, pooled, self.eps)
        # Kept for step() and the diagnostics: no tensor of the autograd graph.
        slots = pooled._replace(mean=None, var=None)
        self.window.keep(position, StepCall(record, finite, slots, 1 + ages, shift, skips))
        self._call_index += 1
        return out

    def _empty(self, x: Tensor) -> Tensor:
        """No positions (a RoI head without RoIs): an empty output, with a (zero)
        gradient for the parameters; the batch counted and nothing else changed, as BN."""
        if self.training and self.track_running_stats:
            self._momentum_factor()
        shape = (1, -1, 1, 1)
        out = x * (self.weight.view(shape) if self.weight is not None else 1.0)
        return out + self.bias.view(shape) if self.bias is not None else out

    def _traced_forward(self, x: Tensor) -> Tensor:
        """Under ``torch.fx`` tracing: the eval-mode function, BN's, with the running statistics."""
        if self.training:
            raise RuntimeError(
                f'{self._describe()}: torch.fx traces CBN only in eval mode (a training step '
                'keeps a window across steps); call model.eval() first, or '
                'cbn_plugin.convert_to_bn(model) for deployment')
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

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
        if self.training and x.numel() == x.shape[1] and x.shape[1] > 0:
            raise ValueError(
                f'{self._describe()} got one value per channel (input {tuple(x.shape)}) while '
                f'acting as plain BN (burn-in, window_size=1, a frozen conv or a no_grad '
                f'forward), and BN cannot normalise a single value: use a window '
                f'(window_size > 1, no burn-in) or more than one value per channel')
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        if x.shape[0] == 0:
            return self._empty(x)
        factor = self._momentum_factor()
        # BN updates the running statistics it is given in place and autograd
        # saves them: give it copies, and commit the finite channels afterwards.
        mean, var = self.running_mean.clone(), self.running_var.clone()
        out = F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)
        with torch.no_grad():
            for buffer, new in ((self.running_mean, mean), (self.running_var, var)):
                buffer.copy_(torch.where(torch.isfinite(new), new, buffer))
        return out

    def _momentum_factor(self) -> float:
        """BN's bookkeeping: count the batch, return the running-average factor."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average (the host mirror: no read)
            # Counted only here: a host count that changes every step would make
            # a compiled model recompile every step.
            self._batches += 1
            return 1.0 / self._batches
        return self.momentum

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
            raise RuntimeError(
                f'{self._describe()} is bound to conv {self._binding.conv_name!r} but its input is not '
                "that conv's output: the conv must feed the norm directly (bind pairs "
                'conv -> norm; pass pairs= for other layouts, or use rho=0)')

    def _update_running_stats(self, step: CF.SlotStats, count, pooled: CF.PooledStats) -> None:
        """BN's running-statistics update, from the batch or from the window.

        Per channel and without a host sync: a channel whose update is not
        finite keeps its previous value.
        """
        if not self.track_running_stats:
            return
        factor = self._momentum_factor()
        with torch.no_grad():
            if self.running_stats == 'batch':
                # count: an int, or SyncCBN's global count as a tensor (never read)
                unbias = count / (count - 1) if isinstance(count, Tensor) or count > 1 else 1.0
                mean, var = step.mean, step.var * unbias
            else:
                total = pooled.count * count
                mean, var = pooled.mean, pooled.var * total / (total - 1).clamp_min_(1)
            CF.running_update(self.running_mean, self.running_var, mean, var, factor)

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The host mirrors: the one time they are read from tensors.
        steps = state_dict.get(prefix + 'num_steps')
        batches = state_dict.get(prefix + 'num_batches_tracked')
        self._steps = int(steps) if isinstance(steps, Tensor) else 0
        self._batches = int(batches) if isinstance(batches, Tensor) else 0
        self.window.load(state_dict, prefix, local_metadata.get('version'),
                         self._state_device(), error_msgs)
        self._reset_step_state()
        self._refresh_phase()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def window_numel(self) -> int:
        """Numbers held by the window buffers (the memory the window costs)."""
        return self.window.numel()

    def _describe(self) -> str:
        name = '' if self._binding is None else self._binding.layer_name
        return f'CBN layer {name!r}' if name else f'CBN layer ({self.num_features} channels)'

    def extra_repr(self) -> str:
        return (super().extra_repr() + f', window_size={self.window_size}, rho={self.rho}, '
                f'variance_rule={self.variance_rule!r}, running_stats={self.running_stats!r}, '
                f'stats_backward={self.stats_backward!r}, compensation={self.compensation!r}, '
                f'dvar_stride={self.dvar_stride}, per_call_windows={self.per_call_windows}')


from .sync import SyncCrossIterationBatchNorm2d  # noqa: E402,F401  (its home is sync.py)
