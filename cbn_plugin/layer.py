"""The Cross-Iteration BatchNorm layer: a thin ``_BatchNorm`` over ``functional``.

Subclassing ``_BatchNorm`` keeps everything that keys on BN working unchanged:
mmcv's ``'bn'`` abbreviation, ``norm_eval``, weight-decay rules, BN
checkpoints. A fresh layer's ``state_dict`` is exactly ``nn.BatchNorm2d``'s;
the window buffers appear once the layer has recorded a step, so a resumed
run restores them. The window's layout and ring live in ``window.py``, the
maths in ``functional.py``, the options in ``options.py``, the plain BN the layer
is when it pools nothing in ``plain_bn.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import compat
from . import functional as CF
from .options import (COMPENSATIONS, MODES, RUNNING_STATS_SOURCES,  # noqa: F401 (re-exported)
                      STATS_BACKWARD, VARIANCE_RULES, check_int, check_layer_options)
from .plain_bn import PlainBatchNorm
from .window import (ENTRY_BUFFERS, PLAIN, POOLING, WINDOW_BUFFERS,  # noqa: F401
                     CrossIterationWindow, PastEntries, StepCall, WindowCommit, WindowSchedule,
                     commit_windows, moved_like, saved_window_size)


class Binding(NamedTuple):
    """The conv a layer is paired with (a reference: the conv belongs to its own parent)."""
    conv: torch.nn.Conv2d | None
    hook: object | None        # the conv's forward hook handle
    layer_name: str
    conv_name: str


class CrossIterationBatchNorm2d(PlainBatchNorm):
    """BatchNorm whose statistics pool the last ``window_size`` optimizer steps.

    Version 3 of its state adds ``window_valid`` (older states are upgraded).

    Args beyond ``nn.BatchNorm2d``'s:
        window_size: steps pooled, the current one included (k). 1 is BN. Not
            given: ``CBNHook`` derives it from the images per optimizer step
            (``window_images``); on its own the layer pools 4.
        rho: weight of the Taylor compensation in [0, 1]: 1 is CBN, 0 naive CBN.
        mode: ``'default'`` or ``'paper'``: presets (``options.MODES``) for the next
            three; each given explicitly overrides its preset.
        variance_rule: ``'clamp'`` (``max(nu, mu^2)`` per entry) or
            ``'exclude'`` (drop entries with ``nu < mu^2``, the authors' code).
        running_stats: what the running statistics used at inference track:
            ``'batch'`` (the current batch, as BN; the paper) or ``'window'``
            (the pooled window statistics; default).
        stats_backward: ``'compensated'`` (default): the exact gradient of the
            forward (the compensated past entries pass gradient to the bound
            conv's weight and bias); ``'current'`` (the paper): only this
            batch's statistics carry gradient, at weight 1/k; ``'pooled'``:
            BN's backward as if the pooled statistics were this batch's.
        compensation: the first-order step on the mean and the variance
            (``'var'``, default) or on the mean and the second moment
            (``'mu_nu'``, the paper: also subtracts ``rho^2 d_mu^2``).
        dvar_stride: 1 computes ``dvar/dW`` exactly; ``s > 1`` estimates it from one
            output position in ``s^2`` (``s^2`` times cheaper; statistics exact).
        per_call_windows: several calls between two steps: ``False`` pools them
            into the step's slot (gradient accumulation); ``True`` keeps a window
            per call position (a head shared over FPN levels).
        accumulation: under ``per_call_windows=False``, ``'merge'`` pools each
            call with the step's earlier calls, ``'own'`` with past steps only,
            ``'two_pass'`` with all the step's calls, from a statistics pass run
            before the training pass (``cbn_plugin.statistics_pass``; with
            ``window_size=1``: BN over the step's micro-batches); the step's
            record and running statistics take every call.

    ``cbn_plugin.bind`` (or ``CBNHook``) pairs the layer with the conv producing
    its input; ``cbn_plugin.step`` (or the hook) marks each optimizer step. A
    training step reads nothing back from the device and its forward reads no
    ring position. A single value per channel pools like any batch (on a step
    with an empty window: running statistics; as plain BN: an error); an empty
    batch gives an empty output, as BN's (``docs/algorithm.md``).
    """

    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 window_size: int | None = None,
                 rho: float = 1.0, variance_rule: str = 'clamp', mode: str = 'default',
                 running_stats: str | None = None, stats_backward: str | None = None,
                 compensation: str | None = None, dvar_stride: int = 1,
                 per_call_windows: bool = False, accumulation: str = 'merge', device=None,
                 dtype=None) -> None:
        options = check_layer_options(window_size, rho, variance_rule, mode, running_stats,
                                      stats_backward, compensation, dvar_stride,
                                      per_call_windows, eps, accumulation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        for name, value in options.items():
            setattr(self, name, value)
        for name in WINDOW_BUFFERS:
            self.register_buffer(name, None)
        self.window = CrossIterationWindow(self._buffers, self.window_size - 1)
        self._steps = 0  # the host mirror of num_steps
        # The bound conv (see attach), held in a tuple: never a submodule of this
        # layer (no duplicate in state_dict or named_modules).
        self._binding: Binding | None = None
        # Window figures (diagnostics) cost a few ops per step: computed only
        # while this is set (CBNHook sets it on the iterations it logs).
        self.track_diagnostics = False
        self._collecting = False  # in a statistics pass (begin_statistics_pass)
        self._reset_step_state()
        self.set_schedule()

    def set_window_size(self, window_size: int) -> None:
        """Pool ``window_size`` steps from now on: before the layer has recorded a step."""
        check_int('window_size', window_size, 1, self._describe() + ':', '1 is plain BN')
        if self.window_mean is not None or self.window.calls:
            raise RuntimeError(f'{self._describe()}: set_window_size({window_size}) after the '
                               f'layer has recorded steps (window_size={self.window_size}); '
                               'it can change only before the first step')
        self._resize_window(window_size, given=True)

    def _resize_window(self, window_size: int, given: bool) -> None:
        self.window_size, self.window_size_given = window_size, given
        self.window = CrossIterationWindow(self._buffers, window_size - 1)
        self.set_schedule(self.burn_in_steps, self.ramp_steps)

    def set_schedule(self, burn_in_steps: int = 0, ramp_steps: int = 0) -> None:
        """Plain BN for the first ``burn_in_steps`` optimizer steps, then the window
        (all at once, or grown linearly over ``ramp_steps`` steps)."""
        self.schedule = WindowSchedule(self.window_size, burn_in_steps, ramp_steps,
                                       self._describe())
        # What the forward branches on (see WindowSchedule.phase).
        self._phase = self.schedule.phase(self._steps)

    burn_in_steps = property(lambda self: self.schedule.burn_in,
                             lambda self, value: self.set_schedule(value, self.ramp_steps))
    ramp_steps = property(lambda self: self.schedule.ramp,
                          lambda self, value: self.set_schedule(self.burn_in_steps, value))

    # ------------------------------------------------------------------ binding
    @property
    def compensates(self) -> bool:
        return self.window_size > 1 and self.rho != 0.0

    @property
    def needs_conv(self) -> bool:
        """Whether the layer needs the conv's derivatives: to compensate past steps, or for
        the exact gradient through a two-pass step's other micro-batches."""
        return self.compensates or (self.accumulation == 'two_pass'
                                    and self.stats_backward == 'compensated')

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
        if self.training and self.needs_conv and (torch.is_grad_enabled() or self._collecting):
            self._conv_io = (args[0], output)

    # ------------------------------------------------------------------ steps
    def _reset_step_state(self) -> None:
        self._conv_io = None
        self._call_index = 0
        # The running-statistics updates of this step's pooled calls, per call position,
        # made at its end (``end_steps``: with every layer's, a few ops for all of them).
        self._running_updates: dict[int, list[CF.RunningUpdate]] = {}
        self._running_saved = False  # a plain first call's update can be taken back

    def step(self) -> None:
        """Mark the end of an optimizer step: this step's records join the window, its
        running-statistics update is made. Every layer of a model at once (fewer ops):
        ``cbn_plugin.step(model)``."""
        end_steps([self])

    def _step_commit(self) -> WindowCommit:
        """Checks at the end of a step (before anything changes) and the window's part."""
        passed = len(self.window.pass_calls)
        if passed and passed != self._call_index:
            raise RuntimeError(f"{self._describe()} (accumulation='two_pass'): the statistics "
                               f'pass made {passed} calls and the training pass '
                               f'{self._call_index}: they must run the same micro-batches')
        if self.num_steps is None:
            self.num_steps = torch.zeros((), dtype=torch.long, device=self._state_device())
        return WindowCommit(self.window, self.window_size > 1, self.compensates,
                            self._active_window() - 1)

    def _take_running_updates(self) -> list[CF.RunningUpdate]:
        """This step's pending running-statistics updates, in call order; forgotten here."""
        updates = [u for calls in self._running_updates.values() for u in calls]
        self._running_updates = {}
        return updates

    def _stepped(self) -> None:
        """The host side of a step's end, after the device work (``end_steps``)."""
        self._steps += 1
        self._phase = self.schedule.phase(self._steps)
        self._reset_step_state()

    def discard_step(self) -> None:
        """Forget this step's forward calls without recording them.

        For a forward repeated within one optimizer step as if it were the step's
        first (gradcheck, a probe): the window is left as it is; the running
        statistics keep the calls' updates, as BN's do.
        """
        apply_running_updates([self])
        self.window.discard()
        self._reset_step_state()

    def skip_step(self) -> None:
        """The optimizer step did not happen (``GradScaler`` skipped it for inf/NaN
        gradients): forget this step's forward calls and statistics pass, so that the
        window is as if its batches had never come. The step counter does not advance;
        the running statistics keep the step's update, as BN's do.
        """
        apply_running_updates([self])
        self.window.discard()
        self.window.start_pass()
        self._reset_step_state()

    def begin_statistics_pass(self) -> None:
        """The forwards until ``end_statistics_pass`` are this step's statistics pass
        (``accumulation='two_pass'``, ``cbn_plugin.statistics_pass``): their statistics
        are kept for the training pass; nothing else changes. A pass after the step's
        training pass has begun adds to the step's (a step in parts); one before replaces."""
        if self.accumulation != 'two_pass':
            raise RuntimeError(f'{self._describe()} has accumulation={self.accumulation!r}: a '
                               "statistics pass is for accumulation='two_pass'")
        if self._call_index == 0:
            self.window.start_pass()
        self._collecting = True

    def end_statistics_pass(self) -> None:
        self._collecting = False

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
        """The window figures of the latest forward, read when asked, never in a step
        (``CrossIterationWindow.diagnostics``; the compensation's only while
        ``track_diagnostics`` is set)."""
        return self.window.diagnostics(self.compensates, self._active_window() - 1)

    @property
    def steps_done(self) -> int:
        """Optimizer steps seen (the host mirror of ``num_steps``)."""
        return self._steps

    # ------------------------------------------------------------------ forward
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f'CBN expects a 4D (N, C, H, W) input, got {input.dim()}D')

    def _window_in_use(self) -> bool:
        pooled_step = self.accumulation == 'two_pass'  # window_size=1: BN over the step
        if not (self.training and (self.window_size > 1 or pooled_step)
                and (torch.is_grad_enabled() or self._collecting)):
            return False
        if self._binding is None and (self.window_size > 1 or self.needs_conv):
            raise RuntimeError(
                f'{self._describe()} has window_size={self.window_size} but was never bound: '
                'call cbn_plugin.bind(model) before training and cbn_plugin.step(model) after '
                "each optimizer step, or add dict(type='CBNHook') to custom_hooks")
        conv = None if self._binding is None else self._binding.conv
        # A frozen conv never changes, and BN is what a frozen layer should be.
        return conv is None or conv.weight.requires_grad

    def _active_window(self) -> int:
        return self.schedule.active(self._steps)

    def forward(self, x: Tensor) -> Tensor:
        if compat.is_fx_symbolic_tracing():
            return self._traced_forward(x)
        self._check_input_dim(x)
        conv_io, self._conv_io = self._conv_io, None
        phase = self._phase
        if not self._window_in_use() or phase == PLAIN:
            if self._collecting and self.training:  # a statistics pass in burn-in: keeps nothing
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            return self._batch_norm(x)
        group = self._group()
        if x.shape[0] == 0 and group is None:
            return CF.empty_norm(x, self.weight, self.bias) if self._collecting else self._empty(x)
        position = self._call_index if self.per_call_windows else 0
        pooling = phase == POOLING
        # 1. this call's statistics (and their derivatives in the conv weight)
        # (a statistics pass needs them only for the exact backward through its calls)
        current = self._current(x, conv_io, group=group, derivatives=self.needs_conv and (
            not self._collecting or self.stats_backward == 'compensated'))
        if self._collecting:  # the statistics pass: normalised as 'merge' would; nothing kept
            pooled = self._pool(self.window.collect(current), self._entries(0, pooling, current))
            return F.batch_norm(x, pooled.mean, pooled.var, self.weight, self.bias, False, 0.0,
                                self.eps)
        others = (self.window.others(self._call_index, self._describe())
                  if self.accumulation == 'two_pass' else None)
        count = current.count
        first_call = position not in self.window.calls
        if first_call and group is None and others is None and not (
                pooling and self.window.holds(position)):
            # Nothing to pool yet: exactly BN (one value per channel: the running statistics).
            self._save_running()
            out = self._seed_window(x) if count == 1 and pooling else self._batch_norm(x)
            self.window.keep(position, StepCall(current, None, None, None))
            self._call_index += 1
            return out
        # 2. the step's statistics: this call merged with the step's earlier calls
        step_stats, record, finite, share, earlier, skips = self.window.merge(position, current)
        if self.accumulation == 'own':  # this call's own images and the past steps only
            step_stats, share, earlier = current, 1.0, None
        elif others is not None:  # the whole step: the statistics pass's other calls
            step_stats, _, _, share, earlier, _ = CF.merge_calls(current, others, None, None)
        # 3. the past entries, compensated, pooled with the step's
        entries = self._entries(position, pooling, current)
        pooled = self._pool(step_stats, entries, earlier,
                            exact=self.stats_backward == 'compensated' and self.needs_conv)
        self._defer_running_update(position, step_stats, pooled)
        # 4. normalise; the gradient reaches x through this call's statistics
        if self.stats_backward == 'pooled':  # BN's backward, as if pooled were this batch's
            stat_weight = torch.ones_like(pooled.mean)
        else:
            stat_weight = (pooled.count.reciprocal() if isinstance(share, float) and share == 1.0
                           else share / pooled.count)
        out = CF.pooled_batch_norm(x, pooled.mean, pooled.var, stat_weight, self.weight,
                                   self.bias, self.eps, count, group)
        shift = CF.window_shift(entries, pooled, self.eps) if self.track_diagnostics else None
        # Kept for step() and the diagnostics: no tensor of the autograd graph.
        self.window.keep(position, StepCall(record, finite, pooled._replace(mean=None, var=None),
                                            shift, skips))
        self._call_index += 1
        return out

    def _entries(self, position: int, pooling: bool, like: CF.SlotStats) -> CF.WindowEntries:
        """The window's entries this call pools (none unless ``pooling``); while a ramp
        grows the window, the newest of them, chosen on the device."""
        if not pooling:
            return self.window.no_entries(like)
        ages = self.schedule.past_steps(self.num_steps) if self.schedule.ramp else None
        return self.window.entries(position, like, ages)

    def _pool(self, step: CF.SlotStats, entries: CF.WindowEntries, earlier=None,
              exact: bool = False) -> CF.PooledStats:
        """The step's statistics pooled with the window's entries, compensated to the conv."""
        conv = self.bound_conv
        return CF.pool_compensated(
            step.mean, step.var, entries, None if conv is None else conv.weight,
            None if conv is None else conv.bias, self.rho if self.compensates else 0.0,
            self.compensation, self.variance_rule, differentiable=exact,
            earlier=earlier if exact else None)

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
                f'{self._describe()} is bound to conv {self._binding.conv_name!r} but its input '
                "is not that conv's output: the conv must feed the norm directly (bind pairs "
                'conv -> norm; pass pairs= for other layouts, or use rho=0)')

    def _keeps_one_update_per_step(self) -> bool:
        """Several calls per step (gradient accumulation) make one running-statistics
        update per optimizer step, from the whole step's statistics, as the large batch the
        micro-batches emulate (a cumulative average, ``momentum=None``, counts each call;
        so does a window per call position)."""
        return not self.per_call_windows and self.momentum is not None \
            and self.track_running_stats

    def _save_running(self) -> None:
        """Before a first call that updates the running statistics as BN does: kept, so
        that a later pooled call of the step takes that update back (its own, made at
        the step's end, is from the whole step's statistics)."""
        if not self._keeps_one_update_per_step():
            return
        buffers = [self.running_mean, self.running_var]
        start = getattr(self, '_running_at_step_start', None)
        if start is None or start[0].shape != buffers[0].shape:  # storage kept across steps
            start = self._running_at_step_start = [torch.empty_like(t) for t in buffers]
        torch._foreach_copy_(start, buffers)
        self._running_saved = True

    def _defer_running_update(self, position: int, step: CF.SlotStats,
                              pooled: CF.PooledStats) -> None:
        """BN's running-statistics update for this call (from the batch or from the
        window), made at the end of the step with every layer's (``end_steps``)."""
        if not self.track_running_stats:
            return
        if self._running_saved:  # the step's first call updated them as BN: taken back
            torch._foreach_copy_([self.running_mean, self.running_var],
                                 self._running_at_step_start)
            self._running_saved = False
        window = self.running_stats == 'window'
        update = CF.RunningUpdate(
            self.running_mean, self.running_var, self.num_batches_tracked,
            pooled.mean if window else step.mean, pooled.var if window else step.var,
            pooled.count if window else None, step.count, self.momentum, 1)
        calls = self._running_updates.setdefault(position, [])
        if calls and self._keeps_one_update_per_step():  # this call's replaces the step's
            update = update._replace(calls=calls[-1].calls + 1)
            calls.clear()
        calls.append(update)

    # ------------------------------------------------------------------ state
    def _apply(self, fn, *args, **kwargs):
        """``Module._apply`` (``.cuda()``, ``.to()``, ``.half()``, ...), and then:

        * the window's entries keep the statistics' dtype: a float16/bfloat16 cast
          (``model.half()``) would round them and mix dtypes in the next pool (the
          statistics of a float16 input are float32), so they move with the module
          but are not cast to those dtypes;
        * the tensors kept outside the buffers follow the module's device.
        """
        if getattr(self, '_running_updates', None):  # this step's, to the buffers they update
            apply_running_updates([self])
        entries = {name: self._buffers[name] for name in ENTRY_BUFFERS
                   if self._buffers.get(name) is not None}
        super()._apply(fn, *args, **kwargs)
        for name, before in entries.items():
            after = self._buffers[name]
            if after.dtype != before.dtype and after.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = moved_like(before, fn)
        self.window.follow(fn)
        if getattr(self, '_running_at_step_start', None) is not None:  # as the running stats
            self._running_at_step_start = [fn(t) for t in self._running_at_step_start]
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The host mirrors: the one time they are read from tensors.
        steps = state_dict.get(prefix + 'num_steps')
        self._steps = int(steps) if isinstance(steps, Tensor) else 0
        saved = saved_window_size(state_dict, prefix)  # taken if derived, refused if given
        if saved not in (None, self.window_size) and self.window_size_given:
            error_msgs.append(f'{prefix}window_*: the state holds a window of {saved} steps, '
                              f'this layer pools window_size={self.window_size}: build it with '
                              f'window_size={saved}, or leave window_size out of its config')
        elif saved not in (None, self.window_size):
            self._resize_window(saved, given=False)
        self.window.load(state_dict, prefix, local_metadata.get('version'),
                         self._state_device(), error_msgs)
        self._reset_step_state()
        self._phase = self.schedule.phase(self._steps)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def window_numel(self) -> int:
        return self.window.numel()  # the numbers the window holds (its memory)

    def _describe(self) -> str:
        name = '' if self._binding is None else self._binding.layer_name
        return f'CBN layer {name!r}' if name else f'CBN layer ({self.num_features} channels)'

    def extra_repr(self) -> str:
        return (super().extra_repr() + f', window_size={self.window_size}, rho={self.rho}, '
                f'variance_rule={self.variance_rule!r}, running_stats={self.running_stats!r}, '
                f'stats_backward={self.stats_backward!r}, compensation={self.compensation!r}, '
                f'dvar_stride={self.dvar_stride}, per_call_windows={self.per_call_windows}, '
                f'accumulation={self.accumulation!r}')


def apply_running_updates(layers) -> None:
    """Make the layers' pending running-statistics updates (``CF.running_updates``), each
    layer's in call order: in rounds that hold each layer once."""
    pending = [layer._take_running_updates() for layer in layers]
    with torch.no_grad():
        for turn in range(max(map(len, pending), default=0)):
            CF.running_updates([updates[turn] for updates in pending if len(updates) > turn])


def end_steps(layers) -> None:
    """The end of an optimizer step for CBN ``layers`` (``cbn_plugin.step``): each one's
    running statistics updated, records written to its window, step counter advanced.

    The device work of all the layers runs together (``CF.running_updates``,
    ``commit_windows``): a few foreach ops for the model, not a few per layer; what
    depends on a layer's shapes (its record's indexed write) stays its own.
    """
    commits = [layer._step_commit() for layer in layers]  # may raise: before any change
    apply_running_updates(layers)
    commit_windows(commits, [layer.num_steps for layer in layers])
    for layer in layers:
        layer._stepped()


from .sync import SyncCrossIterationBatchNorm2d  # noqa: E402,F401  (its home is sync.py)
