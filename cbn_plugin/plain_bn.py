"""The plain BN a CBN layer is when it pools nothing: burn-in, ``window_size=1``, a frozen
conv, a forward without gradient, evaluation.

``nn.BatchNorm2d``'s computation, with the guards a layer that trains at one or two images
needs: non-finite batch statistics never reach the running ones, a single value per
channel is refused by name, an empty batch gives an empty output, and the running
average's count is mirrored on the host (a training step reads nothing back).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as CF


class PlainBatchNorm(_BatchNorm):
    """``_BatchNorm`` with the guards above; the base of the CBN layer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._batches = 0  # the host mirror of num_batches_tracked

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
        out = F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)
        with torch.no_grad():
            # ``new - new`` is 0 exactly where ``new`` is finite: one op for both tensors.
            zeros = torch._foreach_sub([mean, var], [mean, var])
            torch._foreach_copy_([self.running_mean, self.running_var],
                                 [torch.where(z == 0, new, old) for z, new, old in
                                  zip(zeros, (mean, var), (self.running_mean, self.running_var))])
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

    def _empty(self, x: Tensor) -> Tensor:
        """No positions (a RoI head without RoIs): as BN, the batch counted, nothing else."""
        if self.training and self.track_running_stats:
            self._momentum_factor()
        return CF.empty_norm(x, self.weight, self.bias)

    def _running_norm(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)
