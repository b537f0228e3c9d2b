"""SyncCBN: CBN whose statistics are pooled across devices and across steps."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as CF
from .layer import CrossIterationBatchNorm2d
from .window import moved_like


class SyncCrossIterationBatchNorm2d(CrossIterationBatchNorm2d):
    """CBN whose statistics are pooled across devices *and* across steps.

    Per forward, one all-reduce of ``1 + 2C`` numbers (``1 + 2C + P + |W|``
    when it compensates: the patch sum and ``sum (x - s) p``, which are
    linear and so reduce exactly) gives every device the statistics and
    derivatives of the global batch; the window then holds global entries and
    is identical everywhere. The backward all-reduces ``2C`` numbers, as
    SyncBN's does. A device with an empty batch still joins both. Without an
    initialised process group (or in a world of one) it behaves as CBN, with
    a one-time warning, like mmengine's SyncBN.
    """

    def __init__(self, num_features: int, *args, process_group=None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        if self.dvar_stride != 1:
            raise ValueError(f'SyncCBN supports only exact derivatives (dvar_stride=1), got '
                             f'dvar_stride={self.dvar_stride}')
        if self.accumulation == 'two_pass':
            raise ValueError("SyncCBN does not support accumulation='two_pass' (its statistics "
                             "pass is not synchronised): use accumulation='merge'")
        self.process_group = process_group
        self._warned = False
        self._shift: Tensor | None = None
        # The shift at the end of the last step taken: a step the optimizer skipped
        # (skip_step) must not leave its mean behind as the next step's shift.
        self._shift_at_step = None

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
        self._shift = self._shift_at_step = value

    def _apply(self, fn, *args, **kwargs):
        """The shift follows the module's device (``model.cuda()``), in its own dtype: it
        is no buffer (rank-local, outside the ``state_dict``; ``cbn_plugin.engine``
        saves it)."""
        super()._apply(fn, *args, **kwargs)
        if self._shift is not None:
            self._shift = moved_like(self._shift, fn)
        if self._shift_at_step is not None:
            self._shift_at_step = moved_like(self._shift_at_step, fn)
        return self

    def _stepped(self) -> None:
        super()._stepped()
        self._shift_at_step = self._shift

    def skip_step(self) -> None:
        """CBN's, and the shift goes back to the last step taken's."""
        super().skip_step()
        self._shift = self._shift_at_step

    def _group(self):
        if dist.is_available() and dist.is_initialized() \
                and dist.get_world_size(self.process_group) > 1:
            return self.process_group if self.process_group is not None else dist.group.WORLD
        if not self._warned:
            warnings.warn('SyncCBN: no initialised process group with more than one process; '
                          'the statistics are this process\'s own, as in CBN', stacklevel=3)
            self._warned = True
        return None

    def _current(self, x: Tensor, conv_io, derivatives: bool, group=None) -> CF.SlotStats:
        if group is None:
            return super()._current(x, conv_io, derivatives)
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
        # Per channel and without a host sync (step() checks the whole record).
        self._shift = torch.where(torch.isfinite(current.mean), current.mean, shift)
        return current

    def _batch_norm(self, x: Tensor) -> Tensor:
        """SyncBN: burn-in, window 1, frozen convs and no_grad forwards in training."""
        group = self._group() if self.training else None
        if group is None:
            return super()._batch_norm(x)
        current = self._current(x, None, derivatives=False, group=group)
        ones = torch.ones_like(current.mean)
        alone = CF.PooledStats(current.mean, current.var, ones, None, None, None)
        self._update_running_stats(current, current.count, alone)
        return CF.pooled_batch_norm(x, current.mean, current.var, ones, self.weight, self.bias,
                                    self.eps, current.count, group)
