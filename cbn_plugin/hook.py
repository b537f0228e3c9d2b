"""CBNHook: binds CBN layers, owns the burn-in schedule, marks optimizer steps.

Like mmengine's EMAHook it stays small: the schedule's clock (each layer's
step counter) and the windows live in the layers and are saved with the
model, so resume needs nothing from the hook.

Config::

    custom_imports = dict(imports=['cbn_plugin'], allow_failed_imports=False)
    custom_hooks = [dict(type='CBNHook', burn_in_epochs=8)]
"""
from __future__ import annotations

import math

import torch
from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .binding import bind, cbn_layers, skip_step, step
from .loops import TwoPassLoopMixin
from .mmengine_internals import accumulative_counts
from .options import WINDOW_IMAGES, check_int, check_number, derived_window_size


def _norm_types(node) -> set:
    if isinstance(node, dict):
        found = {node['type']} if isinstance(node.get('type'), str) else set()
        return found.union(*(_norm_types(v) for v in node.values()))
    if isinstance(node, (list, tuple)):
        return set().union(*(_norm_types(v) for v in node))
    return set()


def _refuse_sync_bn_conversion(cfg) -> None:
    """mmengine's ``sync_bn`` converts every _BatchNorm subclass, CBN included."""
    if cfg is None or not cfg.get('sync_bn'):
        return
    cbn_types = _norm_types(cfg.get('model', {})) & {'CBN', 'SyncCBN'}
    if cbn_types:
        raise ValueError(
            f"cfg.sync_bn={cfg.get('sync_bn')!r} makes mmengine replace every BatchNorm "
            f'subclass by SyncBatchNorm, which would silently turn the model\'s '
            f'{sorted(cbn_types)} layers into plain SyncBN. Remove sync_bn and use '
            "norm_cfg=dict(type='SyncCBN') for cross-device CBN (cbn_plugin.convert_sync_cbn "
            'converts a built model)')


def _refuse_precise_bn(runner, layers) -> None:
    """MMPretrain's PreciseBNHook would give CBN windows BN's one-batch statistics."""
    windowed = [layer for layer in layers if layer.window_size > 1]
    found = [type(h).__name__ for h in getattr(runner, 'hooks', [])
             if type(h).__name__ == 'PreciseBNHook']
    if windowed and found:
        raise ValueError(
            f'custom_hooks has a PreciseBNHook (MMPretrain\'s), which recomputes the running '
            f'statistics under torch.no_grad(), where CBN acts as plain BN: for the '
            f'{len(windowed)} CBN layers with window_size={windowed[0].window_size} it would '
            'set one-batch statistics (at batch 1-2 a variance far below the k-batch one they '
            'normalise with in training) and feed the layers after them BN outputs. Use '
            "dict(type='PreciseCBNHook', num_batches=...) instead (cbn_plugin.precise_bn: "
            'pools each CBN layer\'s window as training did, and recomputes plain BN layers '
            'like PreciseBNHook)')


@HOOKS.register_module()
class CBNHook(Hook):
    """Cross-Iteration BN training hook.

    Args:
        burn_in_epochs: epochs of plain BN before the window switches on
            (the authors intended 8 of 12). Converted to optimizer steps from
            the real train dataloader length (per process, so the world size is
            already in it) and the gradient-accumulation count.
        burn_in_iters: the same in training iterations. Give exactly one of the
            two (0 for no burn-in).
        ramp_iters: 0 switches the full window on at once after burn-in;
            otherwise the window grows linearly from 1 to its size over this
            many iterations.
        pairs: explicit ``{cbn_name: conv_name}`` for layouts ``bind`` does not
            know.
        window_images: the images a window pools, for CBN layers whose config
            gives no ``window_size``: ``k = max(2, round(window_images / images
            per optimizer step))`` (per process: batch size x accumulation);
            ``None`` leaves them at 4. Layers with a ``window_size`` keep it.
    """

    priority = 'NORMAL'

    def __init__(self, burn_in_epochs: float | None = None, burn_in_iters: int | None = None,
                 ramp_iters: int = 0, pairs: dict[str, str] | None = None,
                 window_images: int | None = WINDOW_IMAGES) -> None:
        if (burn_in_epochs is None) == (burn_in_iters is None):
            raise ValueError(
                'CBNHook needs exactly one of burn_in_epochs or burn_in_iters (use 0 for no '
                f'burn-in), got burn_in_epochs={burn_in_epochs!r}, burn_in_iters={burn_in_iters!r}')
        if burn_in_epochs is not None:
            check_number('burn_in_epochs', burn_in_epochs, 0.0, owner='CBNHook')
        else:
            check_int('burn_in_iters', burn_in_iters, 0, 'CBNHook')
        check_int('ramp_iters', ramp_iters, 0, 'CBNHook')
        if window_images is not None:
            check_int('window_images', window_images, 1, 'CBNHook', 'None: no derived window')
        self.window_images = window_images
        self.burn_in_epochs, self.burn_in_iters = burn_in_epochs, burn_in_iters
        self.ramp_iters, self.pairs = ramp_iters, pairs
        self._step_hook = None
        self._layers = []
        self._model, self._stepped = None, False  # (set in before_train)

    def _schedule_in_steps(self, runner) -> tuple[int, int, int]:
        accumulate = accumulative_counts(runner.optim_wrapper)
        max_iters = runner.max_iters
        total = math.ceil(max_iters / accumulate)
        if self.burn_in_epochs is not None:
            iters = round(self.burn_in_epochs * len(runner.train_dataloader))
            given = f'burn_in_epochs={self.burn_in_epochs}'
        else:
            iters, given = self.burn_in_iters, f'burn_in_iters={self.burn_in_iters}'
        burn_in = iters // accumulate
        if burn_in >= total:
            raise ValueError(
                f'CBNHook {given} is {burn_in} optimizer steps, but training has only {total} '
                f'({max_iters} iterations, {accumulate} per step): the window would never be '
                f'used. Use a burn-in below {total} steps')
        return burn_in, self.ramp_iters // accumulate, total

    def before_train(self, runner) -> None:
        _refuse_sync_bn_conversion(runner.cfg)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self._layers = [layer for _, layer in cbn_layers(model)]
        if not self._layers:
            print_log('CBNHook: the model has no CBN layer; the hook does nothing',
                      logger='current', level=30)
            return
        _refuse_precise_bn(runner, self._layers)
        self._derive_windows(runner)
        two_pass = [n for n, layer in cbn_layers(model) if layer.accumulation == 'two_pass']
        if two_pass and not isinstance(runner.train_loop, TwoPassLoopMixin):
            raise ValueError(
                f"CBNHook: {len(two_pass)} CBN layers (first {two_pass[0]!r}) have "
                f"accumulation='two_pass', which needs a statistics pass before each step, "
                f'but the train loop is a {type(runner.train_loop).__name__}: use '
                f"train_cfg=dict(type='TwoPassEpochBasedTrainLoop', ...) or "
                f"dict(type='TwoPassIterBasedTrainLoop', ...)")
        bind(model, self.pairs)
        burn_in, ramp, total = self._schedule_in_steps(runner)
        for layer in self._layers:
            layer.set_schedule(burn_in, ramp)
        print_log(f'CBNHook: burn-in {burn_in} of {total} optimizer steps (per process, world '
                  f'size {get_world_size()}), ramp {ramp} steps; resumed at step '
                  f'{self._layers[0].steps_done}', logger='current')
        # The window advances once per real optimizer step, however many
        # forwards (gradient accumulation) or skipped steps there are.
        self._model, self._stepped = model, False
        self._step_hook = runner.optim_wrapper.optimizer.register_step_post_hook(
            self._optimizer_stepped)

    def _optimizer_stepped(self, *_) -> None:
        step(self._model)
        self._stepped = True

    def _derive_windows(self, runner) -> None:
        """The window of layers whose config gives none and that hold no window yet (a
        resumed run keeps the one its checkpoint holds)."""
        derived = [layer for layer in self._layers
                   if not layer.window_size_given and layer.window_mean is None]
        if self.window_images is None or not derived:
            return
        loader = runner.train_dataloader
        batch = loader.batch_size or getattr(loader.batch_sampler, 'batch_size', None)
        if not isinstance(batch, int):
            raise ValueError('CBNHook: cannot read the images per device from the train '
                             f'dataloader (batch_size={batch!r}) to derive the window of '
                             f'{len(derived)} CBN layers: give them a window_size, or '
                             'window_images=None')
        images = batch * accumulative_counts(runner.optim_wrapper)
        window = derived_window_size(images, self.window_images)
        for layer in derived:
            layer.set_window_size(window)
        print_log(f'CBNHook: {len(derived)} CBN layers without a window_size pool k = '
                  f'{window} steps ({images} image{"s" if images != 1 else ""} per optimizer '
                  f'step, window_images={self.window_images})', logger='current')

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        """The layers compute their window figures only on the iterations the logger writes."""
        track = bool(self._layers) and self._logs_now(runner, batch_idx)
        for layer in self._layers:
            layer.track_diagnostics = track

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Log the window figures with the losses, on the iterations the logger writes.

        Reading a tensor waits for the device's queue, and computing the
        figures costs ops in every layer: both happen only on those
        iterations (the figures are that iteration's).
        """
        if not self._layers:
            return
        self._forget_a_skipped_step(runner)
        hub = runner.message_hub
        windows, shifts, negatives = [], [], []
        for layer in self._layers:
            diag = layer.diagnostics
            windows.append(diag.get('window', 1))
            if 'mean_shift' in diag:
                shifts.append(diag['mean_shift'])
                negatives.append(diag['negative_fraction'])
        hub.update_scalar('train/cbn_window', sum(windows) / len(windows))  # host numbers
        if shifts and self._logs_now(runner, batch_idx):
            shift, negative = torch.stack([torch.stack(shifts).mean(),
                                           torch.stack(negatives).mean()]).tolist()
            hub.update_scalar('train/cbn_mean_shift', shift)
            hub.update_scalar('train/cbn_negative_fraction', negative)

    def _forget_a_skipped_step(self, runner) -> None:
        """An iteration that ends an optimizer step (the wrapper's ``should_update``)
        without the optimizer having stepped (``AmpOptimWrapper``'s ``GradScaler``
        skipped it for inf/NaN gradients): its forwards leave the windows, which would
        otherwise merge them into the next step's record."""
        should_update = getattr(getattr(runner, 'optim_wrapper', None), 'should_update', None)
        if self._model is None or should_update is None or not should_update():
            return
        if not self._stepped:
            skip_step(self._model)
        self._stepped = False

    def _logs_now(self, runner, batch_idx: int) -> bool:
        """Whether the logger hook writes this iteration (mmengine's LoggerHook rule)."""
        from mmengine.hooks import LoggerHook
        interval = next((h.interval for h in runner.hooks if isinstance(h, LoggerHook)), 1)
        return (self.every_n_inner_iters(batch_idx, interval)
                or self.end_of_epoch(runner.train_dataloader, batch_idx))

    def after_train(self, runner) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
