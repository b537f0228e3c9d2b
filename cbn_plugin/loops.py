"""Training loops that run the two-pass step for CBN layers with ``accumulation='two_pass'``.

Under gradient accumulation (``optim_wrapper.accumulative_counts = A``) an optimizer step
is A iterations. Before the first of them these loops run the step's A data batches
through the model without gradient, inside ``cbn_plugin.statistics_pass``; then the A
iterations train as usual, each micro-batch normalised with the whole step's statistics.
They look ahead in the data without losing or reordering a batch, and do nothing else
differently from MMEngine's loops. Config::

    norm_cfg = dict(type='CBN', accumulation='two_pass')
    train_cfg = dict(type='TwoPassEpochBasedTrainLoop', max_epochs=12)   # or
    train_cfg = dict(type='TwoPassIterBasedTrainLoop', max_iters=90000)
    optim_wrapper = dict(accumulative_counts=4)

A step that an epoch's end cuts (the epoch's iterations not a multiple of A) gets a
statistics pass for each part: the first part's micro-batches pool what was looked at
before them. The statistics pass costs one forward (loss mode, no gradient) per
micro-batch; batch-level random augmentations in the data preprocessor draw anew in it.
"""
from __future__ import annotations

import collections
import itertools

from mmengine.model import is_model_wrapper
from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from .binding import cbn_layers, statistics_pass
from .mmengine_internals import accumulative_counts


class Lookahead:
    """An iterator that can look at its next items without losing or reordering them."""

    def __init__(self, iterator) -> None:
        self._source = iterator
        self._ahead: collections.deque = collections.deque()

    def __iter__(self):
        return self

    def __next__(self):
        return self._ahead.popleft() if self._ahead else next(self._source)

    def peek(self, n: int) -> list:
        """The next ``n`` items (fewer where the source ends), still to come."""
        while len(self._ahead) < n:
            try:
                self._ahead.append(next(self._source))
            except StopIteration:
                break
        return list(itertools.islice(self._ahead, n))


class TwoPassLoopMixin:
    """The statistics pass of each optimizer step, run before its first iteration."""

    _covered = 0  # the iterations before this one had their statistics pass

    def _statistics_pass(self, data_batch, ahead: Lookahead, stop: int) -> None:
        """At the first iteration of a step (or of its part after ``stop``'s cut): this
        batch and the step's next ones through ``statistics_pass``."""
        model = self.runner.model.module if is_model_wrapper(self.runner.model) \
            else self.runner.model
        if self._iter < self._covered or not any(
                layer.accumulation == 'two_pass' for _, layer in cbn_layers(model)):
            return
        counts = accumulative_counts(self.runner.optim_wrapper)
        end = min((self._iter // counts + 1) * counts, self._max_iters, stop)
        batches = [data_batch] + ahead.peek(end - self._iter - 1)
        # Inside the wrapper's optim_context, as train_step runs the training pass: under
        # AmpOptimWrapper that is autocast, and the statistics must be of the same
        # (float16) activations the training pass normalises.
        with self.runner.optim_wrapper.optim_context(self.runner.model), statistics_pass(model):
            for batch in batches:
                data = model.data_preprocessor(batch, True)
                if isinstance(data, dict):
                    model(**data, mode='loss')
                else:
                    model(*data, mode='loss')
        self._covered = self._iter + len(batches)


@LOOPS.register_module()
class TwoPassEpochBasedTrainLoop(TwoPassLoopMixin, EpochBasedTrainLoop):
    """MMEngine's ``EpochBasedTrainLoop`` with the two-pass step (module docstring)."""

    def run_epoch(self) -> None:
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        self._ahead = Lookahead(iter(self.dataloader))
        self._epoch_end = self._iter + len(self.dataloader)
        for idx, data_batch in enumerate(self._ahead):
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1

    def run_iter(self, idx, data_batch) -> None:
        self._statistics_pass(data_batch, self._ahead, self._epoch_end)
        super().run_iter(idx, data_batch)


@LOOPS.register_module()
class TwoPassIterBasedTrainLoop(TwoPassLoopMixin, IterBasedTrainLoop):
    """MMEngine's ``IterBasedTrainLoop`` with the two-pass step (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dataloader_iterator = Lookahead(self.dataloader_iterator)

    def run_iter(self, data_batch) -> None:
        self._statistics_pass(data_batch, self.dataloader_iterator, self._max_iters)
        super().run_iter(data_batch)
