"""The window of past steps behind a CBN layer: its positions, entries and records.

The entries are the layer's buffers (``window_mean``, ...), so they move,
save and gather with the model like any buffer; ``CrossIterationWindow``
owns their layout, writes a step's record into them, hands the pool the
slots it reads, and upgrades old states. The ring's positions are mirrored
on the host (``StepRing``): a training step reads nothing back from the
device (on a GPU every ``int(tensor)`` waits for the device's queue to
drain), and the forward does not read them at all: it pools every slot with
a mask (a ramping window's built on the device from ``window_next`` and
``num_steps``), and branches only on host values that change a bounded number
of times (``WindowSchedule.phase``, ``StepRing.holds``), so a compiled model
compiles a few graphs whatever the window and however long it trains.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import functional as CF
from .options import check_int

# Persistent window state, ``None`` (absent from the state_dict) until used.
# S call positions (1 unless ``per_call_windows``), K = k-1 past steps.
WINDOW_BUFFERS = (
    'num_steps',         # int64 scalar: optimizer steps seen (the layer's clock)
    'window_next',       # int64 S: ring slot the next step is written to
    'window_filled',     # int64 S: number of valid past steps
    'window_mean',       # S x K x C
    'window_var',        # S x K x C (biased)
    'window_grad_mean',  # S x K x groups x P'  (mean input patch)
    'window_grad_var',   # S x K x C x P'       (dvar/dW)
    'window_valid',      # bool S x K: the slot holds a step with finite statistics
)
ENTRY_BUFFERS = ('window_mean', 'window_var', 'window_grad_mean', 'window_grad_var')


def saved_window_size(state_dict: dict, prefix: str) -> int | None:
    """The window (k, steps) a saved layer state holds; ``None`` if it holds none."""
    entries = state_dict.get(prefix + 'window_mean')
    return entries.shape[1] + 1 if isinstance(entries, Tensor) and entries.dim() == 3 else None


class PastEntries(NamedTuple):
    """The past entries one step pools at one call position, newest first (``J x C``).

    ``mean``/``var``: compensated to the current weights, variance rule
    applied; ``valid``: the entries pooled (the rule may drop some).
    """
    mean: Tensor
    var: Tensor
    valid: Tensor


class StepCall(NamedTuple):
    """What this step's forwards left at one call position, for ``commit_windows`` and
    diagnostics."""
    record: CF.SlotStats       # the step's statistics so far (all its calls)
    finite: Tensor | None      # whether they are finite (None: not checked yet)
    pooled: CF.PooledStats | None  # the last pool's slots (mean, var: None); None: not pooled
    shift: tuple | None        # (mean_shift, negative_fraction) when diagnostics are tracked
    skips: Tensor | None = None  # calls left out as not finite (None: one call, see finite)


# What a forward does (``WindowSchedule.phase``): normalise as BN and record nothing;
# normalise as BN and record the step (burn-in's last k - 1 steps); pool the window.
PLAIN, RECORDING, POOLING = 0, 1, 2


class WindowSchedule:
    """Burn-in and ramp: how many steps a layer pools after ``step`` optimizer steps.

    Set by CBNHook from the config (``set_schedule``); the step counter it is
    compared with is a persistent buffer, so resume needs nothing else.
    """

    def __init__(self, window_size: int, burn_in: int = 0, ramp: int = 0, owner: str = '') -> None:
        self.window_size = window_size
        self.burn_in = check_int('burn_in_steps', burn_in, 0, owner + ':')
        self.ramp = check_int('ramp_steps', ramp, 0, owner + ':')

    def active(self, step: int) -> int:
        """Steps pooled (the current one included) at ``step``."""
        return CF.active_window(step, self.window_size, self.burn_in, self.ramp)

    def phase(self, step: int) -> int:
        """What a forward branches on: ``PLAIN``, ``RECORDING`` or ``POOLING``.

        It changes at most twice (recording starts, pooling starts), never with
        the step count or the ramp: a compiled model compiles a bounded number of
        graphs however long it trains and whatever the window.
        """
        if step < CF.recording_starts(self.window_size, self.burn_in):
            return PLAIN
        return POOLING if self.active(step) > 1 else RECORDING

    def past_steps(self, num_steps: Tensor) -> Tensor:
        """``active(step) - 1`` on the device, from the step counter (a 0-dim int64
        tensor) while pooling with a ramp: no host value that changes per step."""
        k1 = self.window_size - 1
        return ((num_steps - (self.burn_in - 1)) * k1).div_(self.ramp, rounding_mode='floor') \
            .clamp_(max=k1)


class StepRing:
    """Ring positions of ``slots`` past steps (``window_size - 1``) for each call position.

    ``next[p]``: the slot the next step of position ``p`` is written to;
    ``filled[p]``: how many slots hold a step. Newest first, the slot ``a``
    steps back is ``(next - 1 - a) % slots``.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.next: list[int] = []
        self.filled: list[int] = []
        # Whether a position holds a step: what the forward reads (it changes once;
        # ``filled`` changes every step while the ring fills).
        self.holds: list[bool] = []

    @property
    def positions(self) -> int:
        return len(self.next)

    def grow(self, positions: int) -> None:
        """Room for ``positions`` call positions (new ones empty)."""
        missing = positions - len(self.next)
        self.next += [0] * missing
        self.filled += [0] * missing
        self.holds += [False] * missing

    def load(self, next_slots: Tensor | None, filled: Tensor | None) -> None:
        """Take the positions from the buffers of a loaded state (one read, at load time)."""
        self.next = [] if next_slots is None else [int(v) for v in next_slots.tolist()]
        self.filled = [] if filled is None else [int(v) for v in filled.tolist()]
        self.holds = [f > 0 for f in self.filled]

    def ages(self, position: int, most: int) -> int:
        """How many past steps position ``position`` pools, at most ``most``."""
        return min(most, self.filled[position]) if position < self.positions else 0

    def newest_first(self, position: int, ages: int) -> tuple[int, ...]:
        """The slots of the ``ages`` newest steps at ``position``, newest first."""
        newest = self.next[position] - 1
        return tuple((newest - a) % self.slots for a in range(ages))

    def advance(self, position: int) -> None:
        """The step just written at ``position`` becomes the newest."""
        self.next[position] = (self.next[position] + 1) % self.slots
        self.filled[position] = min(self.filled[position] + 1, self.slots)
        self.holds[position] = True

    def filled_mask(self, positions: int, device: torch.device) -> Tensor:
        """``positions x slots`` bool: which slots hold a step."""
        mask = torch.zeros(positions, self.slots, dtype=torch.bool)
        for p in range(positions):
            for slot in self.newest_first(p, self.filled[p]):
                mask[p, slot] = True
        return mask.to(device)


def recent_slots(next_slot: Tensor, slots: int, ages: Tensor) -> Tensor:
    """``slots x 1`` bool: the ``ages`` newest of a ring's slots (a window ramping up),
    from the device's ``next_slot`` and ``ages`` (0-dim int64): no host value, no copy.
    Slot s is ``(next_slot - 1 - s) % slots`` steps back."""
    back = (next_slot - 1 - torch.arange(slots, device=next_slot.device)).remainder_(slots)
    return (back < ages).view(slots, 1)


def moved_like(t: Tensor, fn) -> Tensor:
    """``t`` where ``Module._apply``'s ``fn`` moves it, in its own dtype: a float16 or
    bfloat16 cast (``model.half()``) does not reach the statistics, whose dtype is
    float32 for half-precision inputs (``functional.stats_dtype``)."""
    moved = fn(t)
    return moved if moved.dtype == t.dtype else t.to(moved.device)


def _merged(a: CF.SlotStats | None, b: CF.SlotStats | None) -> CF.SlotStats | None:
    """``a`` and ``b`` merged (``functional.merge_stats``); either may be ``None``."""
    return b if a is None else a if b is None else CF.merge_stats(a, b)


class WindowCommit(NamedTuple):
    """One window's part of an optimizer step's end: each position's record joins the ring
    (``write``), with its derivatives only if the window compensates (``derivatives``);
    ``most``: the past steps this step could pool (what its diagnostics report)."""
    window: 'CrossIterationWindow'
    write: bool
    derivatives: bool
    most: int


def foreach_in_rounds(op, targets: list[Tensor], others: list, **kwargs) -> None:
    """``op(targets, others, **kwargs)`` (an in-place foreach op) where a target may
    appear more than once: in rounds holding each target once, in order (a foreach kernel
    on the GPU updates its list's tensors in parallel)."""
    rounds: list[tuple[list, list]] = []
    for target, other in zip(targets, others):
        for held, given in rounds:
            if not any(t is target for t in held):
                held.append(target)
                given.append(other)
                break
        else:
            rounds.append(([target], [other]))
    for held, given in rounds:
        op(held, given, **kwargs)


def commit_windows(commits: list[WindowCommit], clocks: list[Tensor] = ()) -> None:
    """The end of an optimizer step for many windows at once: every record written, the
    rings advanced, and ``clocks`` (the layers' step counters) with them.

    What does not depend on a layer's shapes runs as a few foreach ops for all the
    windows (the records' finiteness, the ring positions, the counts of records left
    out), not a few per layer; each record's indexed write is its own. On the device
    alone; the host rings advance beside (``StepRing``).
    """
    writes = []
    for commit in commits:
        window = commit.window
        window.last_windows = window.windows(commit.most)
        for position, call in window.calls.items() if commit.write else ():
            record = call.record if commit.derivatives else call.record._replace(
                grad_mean=None, grad_var=None)
            writes.append((window, position, record, call))
        if commit.write and window.calls:  # every position's storage first: it never moves after
            window.reserve(max(window.calls) + 1, writes[-1][2])
    unchecked = [i for i, write in enumerate(writes) if write[3].finite is None]
    checked = dict(zip(unchecked, CF.all_finite_each([writes[i][3].record for i in unchecked])))
    slots, filled, sizes = [], [], []
    single, single_finite, several, several_skips = [], [], [], []
    for i, (window, position, record, call) in enumerate(writes):
        finite = checked.get(i, call.finite)
        slot, count = window.write(position, record, finite)
        slots.append(slot)
        filled.append(count)
        sizes.append(window.slots)
        if window._skipped is None:
            window._skipped = torch.zeros((), dtype=torch.long, device=finite.device)
        if call.skips is None:  # one call: skipped unless finite
            single.append(window._skipped)
            single_finite.append(finite)
            window._records += 1
        else:
            several.append(window._skipped)
            several_skips.append(call.skips)
    if slots or clocks:
        torch._foreach_add_(slots + filled + list(clocks), 1)
    for slot, size in zip(slots, sizes):
        slot.remainder_(size)
    if filled:
        torch._foreach_clamp_max_(filled, sizes)
    foreach_in_rounds(torch._foreach_add_, single, single_finite, alpha=-1)
    foreach_in_rounds(torch._foreach_add_, several, several_skips)
    for window, position, _, _ in writes:
        window.ring.advance(position)
    for commit in commits:
        window = commit.window
        window.last_calls, window.calls = window.calls, {}
        window.start_pass()


class CrossIterationWindow:
    """The last ``slots`` steps' records of one layer, per call position, and this step's.

    ``buffers``: the layer's buffer mapping, in which the entries live (and
    are replaced when the layer moves, loads or allocates). Slot views are
    cached per buffer object, so writing a record and reading a position's
    slots cost one op per tensor, not an indexing chain. This step's calls
    (``calls``) join the ring at ``commit``, the end of the optimizer step:
    until the backward has run, the graph of a compensated backward reads
    the oldest slot, the one a new record replaces.
    """

    def __init__(self, buffers: dict, slots: int) -> None:
        self._buffers = buffers
        self.ring = StepRing(slots)
        self._views: dict[tuple, Tensor] = {}
        self._zeros: dict[torch.dtype, Tensor] = {}  # what a non-finite record is written as
        self.calls: dict[int, StepCall] = {}       # this step's, per position
        self.last_calls: dict[int, StepCall] = {}  # the last finished step's
        self.last_windows: dict[int, int] = {}     # and the steps each of them pooled
        # This step's statistics pass (accumulation='two_pass'): each call's statistics,
        # and their statistics merged so far (what the pass normalises with).
        self.pass_calls: list[CF.SlotStats] = []
        self._pass_merged: CF.SlotStats | None = None
        # What ``others`` merges from, so that a step of A calls costs O(A) merges, not
        # O(A^2): the pass's calls from j on, merged (built when the pass last grew), and
        # the calls before the training pass's next call, merged as it goes. The suffixes
        # hold A merged records with their derivatives until the step ends: memory the
        # size of the pass's own records, for time.
        self._suffixes: list[CF.SlotStats | None] = [None]
        self._prefix: tuple[int, CF.SlotStats | None] = (0, None)
        self._skipped: Tensor | None = None  # minus the finite single-call records
        self._records = 0                    # single-call records written

    def follow(self, fn) -> None:
        """Move the state kept outside the buffers with the module (``Module._apply``'s
        ``fn``: ``model.cuda()``, ``.to(device)``), keeping its dtype."""
        if self._skipped is not None:
            self._skipped = moved_like(self._skipped, fn)

    # ----------------------------------------------------------- this step's calls
    def merge(self, position: int, current: CF.SlotStats):
        """This call merged with the step's earlier calls at ``position``
        (``functional.merge_calls``; its plain values when there are none)."""
        earlier = self.calls.get(position)
        if earlier is None:
            return current, current, None, 1.0, None, None
        return CF.merge_calls(current, earlier.record, earlier.finite, earlier.skips)

    def start_pass(self) -> None:
        """A new statistics pass for this step: the calls of an earlier one are forgotten."""
        self.pass_calls, self._pass_merged = [], None
        self._suffixes, self._prefix = [None], (0, None)

    def collect(self, current: CF.SlotStats) -> CF.SlotStats:
        """Keep a statistics-pass call's statistics; returns the pass's calls so far merged."""
        self.pass_calls.append(current)
        plain = current._replace(grad_mean=None, grad_var=None)  # the derivatives: not pooled
        self._pass_merged = _merged(self._pass_merged, plain)
        return self._pass_merged

    def others(self, index: int, owner: str) -> CF.SlotStats | None:
        """The statistics pass's calls other than call ``index``, merged (``None``: it had
        only that one). The training pass must repeat the statistics pass's calls."""
        if index >= len(self.pass_calls):
            raise RuntimeError(
                f"{owner} (accumulation='two_pass') is at call {index + 1} of this step's "
                f'training pass, but its statistics pass made {len(self.pass_calls)}: run '
                'every micro-batch of the step through the model inside '
                'cbn_plugin.statistics_pass(model) before the training pass')
        calls = self.pass_calls
        if len(self._suffixes) != len(calls) + 1:  # the pass grew (a step in parts)
            self._suffixes = [None] * (len(calls) + 1)
            for j in range(len(calls) - 1, -1, -1):
                self._suffixes[j] = _merged(calls[j], self._suffixes[j + 1])
        done, prefix = self._prefix
        if done != index:  # not the call after the last one: merge from the start
            done, prefix = 0, None
        for j in range(done, index):
            prefix = _merged(prefix, calls[j])
        self._prefix = (index + 1, _merged(prefix, calls[index]))
        return _merged(prefix, self._suffixes[index + 1])

    def keep(self, position: int, call: StepCall) -> None:
        """Keep a forward's record (only a forward that succeeded changes the window)."""
        self.calls[position] = call

    def discard(self) -> None:
        """Forget this step's calls (a forward repeated within a step as if it were its first)."""
        self.calls = {}

    def windows(self, most: int) -> dict[int, int]:
        """Steps this step pools (the current one included) at each position it called,
        when it may pool ``most`` past steps: figures from the host ring, for diagnostics
        (the forward never reads them: they change every step while the ring fills)."""
        return {p: 1 + self.ring.ages(p, most) for p in self.calls}

    def skipped_records(self):
        """Calls whose statistics were not finite (left out), this step's included."""
        skipped = 0 if self._skipped is None else self._skipped + self._records
        for call in self.calls.values():
            skipped = skipped + (call.skips if call.skips is not None
                                 else (~CF.all_finite(call.record)).long())
        return skipped

    def diagnostics(self, compensates: bool, most: int) -> dict:
        """This step's figures (else the last step's): ``window``, the steps pooled
        (``most``: the past steps this step may pool);
        ``skipped_records``, calls left out as not finite; where computed and the
        layer compensates, ``mean_shift`` and ``negative_fraction``
        (``functional.window_shift``), 0-dim tensors."""
        found = {'skipped_records': self.skipped_records()}
        calls = self.calls or self.last_calls
        windows = self.windows(most) if self.calls else self.last_windows
        if windows:
            found['window'] = max(windows.values())
        shifts = [call.shift for call in calls.values() if call.shift is not None]
        if shifts and compensates:
            found['mean_shift'], found['negative_fraction'] = shifts[0]
        return found

    def past_slots(self, position: int, most: int) -> tuple[int, ...]:
        """The ring slots this step pools at ``position``, newest first."""
        call = self.calls.get(position)
        if call is None or call.pooled is None:
            return ()
        return self.ring.newest_first(position, self.ring.ages(position, most))

    def past_entries(self, position: int, most: int, rule: str) -> PastEntries | None:
        """The entries this step pools at ``position``, newest first (row j is slot
        ``past_slots(position, most)[j]``); ``None`` before its first call."""
        call = self.calls.get(position)
        if call is None:
            return None
        slots = self.past_slots(position, most)
        if not slots:
            empty = call.record.mean.new_zeros(0, call.record.mean.shape[0])
            return PastEntries(empty, empty, empty.bool())
        index = torch.tensor(slots, device=call.pooled.past_mean.device)
        var = call.pooled.past_var[index]
        return PastEntries(call.pooled.past_mean[index],
                           var.clamp_min(0) if rule == 'clamp' else var,
                           call.pooled.pooled[index])

    # ----------------------------------------------------------- the ring
    @property
    def slots(self) -> int:
        return self.ring.slots

    def _view(self, name: str, *index: int) -> Tensor:
        """``buffers[name][index]``, made once per buffer object."""
        base = self._buffers[name]
        key = (name, index)
        cached = self._views.get(key)
        if cached is None or cached[0] is not base:
            view = base
            for i in index:
                view = view[i]
            if len(index) == 1 and name == 'window_valid':
                view = view.unsqueeze(1)  # K x 1: a mask over the slots' channels
            elif len(index) == 1 and name in ('window_next', 'window_filled'):
                view = base[index[0]:index[0] + 1]  # (1,): an index for an indexed write
            cached = self._views[key] = (base, view)
        return cached[1]

    def _make_views(self) -> None:
        """Make the views a forward reads, before it reads them: a view first made inside
        a compiled forward would change what the next step's guards see (one more graph)."""
        for name in ENTRY_BUFFERS + ('window_valid', 'window_next', 'window_filled'):
            if self._buffers[name] is not None:
                for position in range(self._buffers[name].shape[0]):
                    self._view(name, position)

    def holds(self, position: int) -> bool:
        """Whether ``position`` holds a past step (host; changes once per position)."""
        return position < self.ring.positions and self.ring.holds[position]

    @staticmethod
    def no_entries(like: CF.SlotStats) -> CF.WindowEntries:
        """No past step to pool, shaped after ``like`` (this step's record)."""
        empty = like.mean.new_zeros(0, like.mean.shape[0])
        grads = (None, None) if like.grad_mean is None else (
            like.grad_mean.new_zeros((0,) + tuple(like.grad_mean.shape)),
            like.grad_var.new_zeros((0,) + tuple(like.grad_var.shape)))
        return CF.WindowEntries(empty, empty, *grads, empty.bool().view(0, 1))

    def entries(self, position: int, like: CF.SlotStats,
                ages: Tensor | None = None) -> CF.WindowEntries:
        """The slots ``position`` pools, in ring order, with a mask of those in use.

        ``like``: this step's record (shapes for a position that has no slots
        yet). ``ages``: while the window ramps up, the past steps it pools (a 0-dim
        int64 tensor, ``WindowSchedule.past_steps``); ``None``: all it holds.
        """
        if self._buffers['window_mean'] is None or position >= self.ring.positions:
            return self.no_entries(like)
        use = self._view('window_valid', position)
        if ages is not None:
            use = use & recent_slots(self._view('window_next', position), self.slots, ages)
        grads = (None, None)
        if like.grad_mean is not None and self._buffers['window_grad_mean'] is not None:
            grads = (self._view('window_grad_mean', position),
                     self._view('window_grad_var', position))
        return CF.WindowEntries(self._view('window_mean', position),
                                self._view('window_var', position), *grads, use)

    def write(self, position: int, record: CF.SlotStats, finite: Tensor) -> tuple[Tensor, Tensor]:
        """Write a step's record into the slot of its oldest step.

        On the device alone: the slot is ``window_next``'s (an indexed write), and
        nothing is read from or written by the host, so a step captured once (a CUDA
        graph) writes the right slot at every replay. A record that is not finite is
        written as zeros and marked invalid. Returns ``(window_next, window_filled)``
        at ``position``, (1,) views: ``commit_windows`` advances them (and the host
        ring beside them) for every window at once.
        """
        self.reserve(position + 1, record)
        slot = self._view('window_next', position)  # (1,) int64, on the device
        zero = self._zeros.get(record.mean.dtype)
        if zero is None or zero.device != record.mean.device:
            zero = self._zeros[record.mean.dtype] = record.mean.new_zeros(())
        fields = [('window_mean', record.mean), ('window_var', record.var)]
        if record.grad_mean is not None:
            fields += [('window_grad_mean', record.grad_mean),
                       ('window_grad_var', record.grad_var)]
        for name, value in fields:
            self._view(name, position).index_put_((slot,), torch.where(finite, value, zero))
        self._view('window_valid', position).index_put_((slot,), finite)
        return slot, self._view('window_filled', position)

    def reserve(self, positions: int, record: CF.SlotStats) -> None:
        """Storage for ``positions`` call positions, shaped after ``record``."""
        held = self._buffers['window_mean']
        if held is None or positions > held.shape[0]:
            self._allocate(positions, record)

    def _allocate(self, positions: int, record: CF.SlotStats) -> None:
        k1, c = self.slots, record.mean.shape[0]
        like = record.mean
        shapes = {'window_mean': (c,), 'window_var': (c,)}
        if record.grad_mean is not None:
            shapes['window_grad_mean'] = tuple(record.grad_mean.shape)
            shapes['window_grad_var'] = tuple(record.grad_var.shape)
        current = self._buffers['window_mean']
        old = current.shape[0] if current is not None else 0
        for name, shape in shapes.items():
            fresh = like.new_zeros((positions - old, k1) + shape)
            current = self._buffers[name]
            self._buffers[name] = fresh if current is None else torch.cat([current, fresh])
        for name, shape, dtype in (('window_next', (), torch.long),
                                   ('window_filled', (), torch.long),
                                   ('window_valid', (k1,), torch.bool)):
            fresh = torch.zeros((positions - old,) + shape, dtype=dtype, device=like.device)
            current = self._buffers[name]
            self._buffers[name] = fresh if current is None else torch.cat([current, fresh])
        self.ring.grow(positions)
        self._make_views()

    def load(self, state_dict: dict, prefix: str, version: int | None, device: torch.device,
             error_msgs: list) -> None:
        """Shape the buffers after a loaded state and take the ring from it.

        Window buffers have data-dependent shapes: taken from the checkpoint.
        A checkpoint without window state (a BN checkpoint, or one from before
        the first step) resets the window: statistics of other weights cannot
        be compensated to the loaded ones. Version 2 states had no
        ``window_valid`` (they kept only finite steps: every filled slot is
        valid); a slot that is not filled is never valid.
        """
        filled = state_dict.get(prefix + 'window_filled')
        self.ring.load(state_dict.get(prefix + 'window_next'), filled)
        if isinstance(filled, Tensor):
            mask = self.ring.filled_mask(self.ring.positions, filled.device)
            valid = state_dict.get(prefix + 'window_valid')
            if valid is None and (version is None or version < 3):
                state_dict[prefix + 'window_valid'] = mask
            elif valid is None:
                error_msgs.append(f'{prefix}window_valid is missing from a version-{version} '
                                  'CBN state that has a window (a damaged or hand-edited '
                                  'state_dict)')
            elif isinstance(valid, Tensor) and valid.shape == mask.shape:
                state_dict[prefix + 'window_valid'] = valid.to(mask.device) & mask
        for name in WINDOW_BUFFERS:
            incoming = state_dict.get(prefix + name)
            if incoming is None:
                self._buffers[name] = None
            elif isinstance(incoming, Tensor):
                self._buffers[name] = torch.empty_like(incoming, device=device)
        self._views.clear()
        self._make_views()
        self.calls, self.last_calls = {}, {}
        self.start_pass()

    def numel(self) -> int:
        """Numbers held by the entries (the memory the window costs)."""
        return sum(self._buffers[n].numel() for n in ENTRY_BUFFERS
                   if self._buffers[n] is not None)
