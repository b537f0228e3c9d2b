"""The plain BN a CBN layer is when it pools nothing: burn-in, ``window_size=1``, a frozen
conv, a forward without gradient, evaluation, an fx trace.

``nn.BatchNorm2d``'s computation, with the guards a layer that trains at one or two images
needs: non-finite batch statistics never reach the running ones, a single value per
channel is refused by name, an empty batch gives an empty output, and a cumulative
running average (``momentum=None``) takes its factor on the device (a training step
reads nothing back, and a compiled one sees no host number change). The
running statistics' update of the pooled path is here too (BN's, from the batch or from
the window).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as CF


class PlainBatchNorm(_BatchNorm):
    """``_BatchNorm`` with the guards above; the base of the CBN layer."""

    def _describe(self) -> str:
        return f'norm layer ({self.num_features} channels)'

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
        if isinstance(factor, Tensor):  # momentum=None: BN's update, with a device factor
            out = F.batch_norm(x, mean, var, self.weight, self.bias, True, 1.0, self.eps)
            with torch.no_grad():
                CF.running_update(self.running_mean, self.running_var, mean, var, factor)
            return out
        out = F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)
        with torch.no_grad():
            # ``new - new`` is 0 exactly where ``new`` is finite: one op for both tensors.
            zeros = torch._foreach_sub([mean, var], [mean, var])
            torch._foreach_copy_([self.running_mean, self.running_var],
                                 [torch.where(z == 0, new, old) for z, new, old in
                                  zip(zeros, (mean, var), (self.running_mean, self.running_var))])
        return out

    def _momentum_factor(self) -> float | Tensor:
        """BN's bookkeeping: count the batch, return the running-average factor.

        ``momentum=None`` (a cumulative average): ``1 / num_batches_tracked`` as a 0-dim
        tensor on the device, where BN reads the count back to the host; a host count
        instead would change every step, and a compiled model recompile at each.
        """
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return self.num_batches_tracked.to(self.running_mean.dtype).reciprocal_()
        return self.momentum

    def _empty(self, x: Tensor) -> Tensor:
        """No positions (a RoI head without RoIs): as BN, the batch counted, nothing else."""
        if self.training and self.track_running_stats:
            self._momentum_factor()
        return CF.empty_norm(x, self.weight, self.bias)

    def _running_norm(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)

    def _seed_window(self, x: Tensor) -> Tensor:
        """One value per channel and an empty window: running statistics, window seeded."""
        if not self.track_running_stats:
            raise ValueError(
                f'{self._describe()} got one value per channel (input {tuple(x.shape)}) and '
                'has no past steps to pool yet nor running statistics to fall back on: use '
                'track_running_stats=True, or a batch with more than one value per channel')
        return self._running_norm(x)

    def _traced_forward(self, x: Tensor) -> Tensor:
        """Under ``torch.fx`` tracing: BN's eval-mode function."""
        if self.training:
            raise RuntimeError(
                f'{self._describe()}: torch.fx traces CBN only in eval mode (a training step '
                'keeps a window across steps); call model.eval() first, or '
                'cbn_plugin.convert_to_bn(model) for deployment')
        return self._running_norm(x)

    def _update_running_stats(self, step: CF.SlotStats, count, pooled: CF.PooledStats) -> None:
        """BN's running-statistics update, from the batch or from the window (no host read)."""
        if self.track_running_stats:
            factor = self._momentum_factor()
            with torch.no_grad():
                mean, var = CF.running_target(step.mean, step.var, count, pooled,
                                              self.running_stats)
                CF.running_update(self.running_mean, self.running_var, mean, var, factor)

    def _state_device(self) -> torch.device:
        for t in (self.running_mean, self.weight):
            if t is not None:
                return t.device
        return torch.device('cpu')
