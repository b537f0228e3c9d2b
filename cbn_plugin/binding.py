"""Pair every CBN layer with the conv that produces its input, and mark steps.

No model code is forked: the pairs are found from the structure OpenMMLab and
torchvision-style models already have, checked, and then verified at run
time (the conv's output must be exactly the tensor the norm receives).
"""
from __future__ import annotations

import contextlib
import logging
import re

import torch
from torch import nn

from .layer import CrossIterationBatchNorm2d, end_steps

_NORM_NAME = re.compile(r'^(?:bn|norm|gn|cbn)(.*)$')


def _is_cbn(module) -> bool:
    return isinstance(module, CrossIterationBatchNorm2d)


def _structural_pairs(parent: nn.Module):
    """``(cbn, conv_or_None)`` pairs visible from ``parent``'s direct children.

    ``None`` means the layout is known and no conv feeds the norm (a
    ConvModule with the norm before the conv).
    """
    children = dict(parent.named_children())
    # mmcv ConvModule: the norm follows the conv only if ``order`` says so.
    norm_name, order = getattr(parent, 'norm_name', None), getattr(parent, 'order', None)
    if isinstance(norm_name, str) and norm_name in children and isinstance(order, tuple) \
            and 'conv' in children and 'norm' in order:
        norm = children[norm_name]
        if _is_cbn(norm):
            conv_first = order.index('conv') < order.index('norm')
            yield norm, children['conv'] if conv_first else None
    # Sibling names: conv1/bn1 (mmdet ResNet blocks and stem), conv/bn, conv2/norm2.
    for name, child in children.items():
        match = _NORM_NAME.match(name)
        if _is_cbn(child) and match and f'conv{match.group(1)}' in children:
            yield child, children[f'conv{match.group(1)}']
    # nn.Sequential: a conv directly followed by the norm (downsample paths, stems).
    if isinstance(parent, nn.Sequential):
        layers = list(children.values())
        for before, after in zip(layers, layers[1:]):
            if _is_cbn(after) and isinstance(before, nn.Conv2d):
                yield after, before


def _check_conv(cbn_name: str, cbn: CrossIterationBatchNorm2d, conv_name: str, conv) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f'CBN {cbn_name!r} is fed by {conv_name!r} ({type(conv).__name__}), '
                        'which is not an nn.Conv2d; compensation needs a standard 2D conv '
                        '(use rho=0 for naive CBN)')
    for method in ('forward', '_conv_forward'):
        owner = next(c for c in type(conv).__mro__ if method in vars(c))
        if owner is not nn.Conv2d and not owner.__module__.startswith('mmcv.cnn.bricks.wrappers'):
            raise TypeError(
                f'CBN {cbn_name!r} is fed by {conv_name!r} ({type(conv).__name__}), whose '
                f'{method} differs from nn.Conv2d\'s (e.g. weight standardisation); the '
                'compensation would be wrong. Use a plain conv or rho=0')
    if conv.out_channels != cbn.num_features:
        raise ValueError(f'CBN {cbn_name!r} has {cbn.num_features} channels but its conv '
                         f'{conv_name!r} has out_channels={conv.out_channels}')


def bind(model: nn.Module, pairs: dict[str, str] | None = None, logger='current'):
    """Pair every CBN layer in ``model`` with the conv producing its input.

    Args:
        model: the model (a DDP wrapper is fine).
        pairs: explicit ``{cbn_name: conv_name}`` for layouts the structural
            rules do not know; names as in ``model.named_modules()``.
        logger: where the table of pairs is printed (mmengine ``print_log``),
            ``None`` for silence.

    Returns the list of ``(cbn_name, conv_name or None)``. Raises when a CBN
    that needs one (``needs_conv``: it compensates, ``rho != 0`` and ``window_size > 1``,
    or takes the exact gradient of a two-pass step) has no conv, or
    when the conv's ``out_channels`` differs from the norm's channels.
    """
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    found: dict[int, nn.Module | None] = {}
    for parent in modules.values():
        for cbn, conv in _structural_pairs(parent):
            found.setdefault(id(cbn), conv)
    for cbn_name, conv_name in (pairs or {}).items():
        for kind, name in (('CBN', cbn_name), ('conv', conv_name)):
            if name not in modules:
                raise KeyError(f'bind pairs: no {kind} named {name!r} in the model')
        if not _is_cbn(modules[cbn_name]):
            raise TypeError(f'bind pairs: {cbn_name!r} is a {type(modules[cbn_name]).__name__},'
                            ' not a CBN layer')
        found[id(modules[cbn_name])] = modules[conv_name]

    table = []
    for name, cbn in modules.items():
        if not _is_cbn(cbn):
            continue
        conv = found.get(id(cbn))
        if conv is None and cbn.needs_conv:
            need, fix = (('compensation', 'rho=0') if cbn.compensates else
                         ("the exact gradient of accumulation='two_pass'",
                          "stats_backward='current'"))
            raise ValueError(
                f'CBN {name!r} (window_size={cbn.window_size}, rho={cbn.rho}) has no conv '
                f'directly before it, and {need} needs one. Put it right after a conv, '
                f'name the conv with bind(model, pairs={{cbn_name: conv_name}}), or use {fix}')
        conv_name = names[id(conv)] if conv is not None else None
        if conv is not None:
            _check_conv(name, cbn, conv_name, conv)
        # A layer that needs no conv keeps no hook on one.
        cbn.attach(conv if cbn.needs_conv else None, name, conv_name or '')
        table.append((name, conv_name))
    if logger is not None and table:
        width = max(len(n) for n, _ in table)
        rows = '\n'.join(f'  {n:<{width}}  <-  {c or "(none: rho=0 or window 1)"}'
                         for n, c in table)
        _log(f'cbn_plugin: bound {len(table)} CBN layers to their convs\n{rows}', logger)
    return table


def _log(message: str, logger) -> None:
    """MMEngine's ``print_log`` where it is installed (its logger names, ``'current'``);
    with torch alone, the ``logging`` module's ``'cbn_plugin'`` logger (or ``logger``
    itself when it is a ``logging.Logger``)."""
    try:
        from mmengine.logging import print_log
    except ImportError:
        target = logger if isinstance(logger, logging.Logger) else logging.getLogger('cbn_plugin')
        target.info(message)
        return
    print_log(message, logger=logger)


def step(model: nn.Module) -> None:
    """Mark the end of an optimizer step for every CBN layer in ``model`` (together:
    ``layer.end_steps``)."""
    end_steps([module for module in model.modules() if _is_cbn(module)])


def skip_step(model: nn.Module) -> None:
    """The optimizer step did not happen: every CBN layer in ``model`` forgets this
    step's forwards (``CrossIterationBatchNorm2d.skip_step``)."""
    for module in model.modules():
        if _is_cbn(module):
            module.skip_step()


class StepTracker:
    """Marks the CBN layers' optimizer steps from the optimizer itself.

    ``GradScaler.step(optimizer)`` does not call ``optimizer.step()`` when the
    gradients hold inf/NaN (routine in float16 training). ``cbn_plugin.step``
    after it would record the skipped step's batches as a step, and leaving it
    out would merge them into the next step's record. Create a tracker before
    training and call ``end_step()`` where ``cbn_plugin.step`` would go (after
    ``scaler.step(optimizer)`` and ``scaler.update()``): it marks the step if the
    optimizer stepped since the last call, and ``skip_step`` otherwise. An
    optimizer step post-hook tells it, on the host: no read from the device.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.stepped = False
        self._handle = optimizer.register_step_post_hook(self._on_step)

    def _on_step(self, *_) -> None:
        self.stepped = True

    def end_step(self) -> bool:
        """The end of an optimizer step (of its last micro-batch under accumulation):
        whether the optimizer stepped, and so whether the step joined the windows."""
        stepped, self.stepped = self.stepped, False
        (step if stepped else skip_step)(self.model)
        return stepped

    def remove(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def statistics_pass(model: nn.Module):
    """The first pass of a two-pass step, for layers with ``accumulation='two_pass'``.

    Run every micro-batch of the optimizer step through ``model`` inside it (no
    gradient is taken), then the training pass over the same micro-batches in the
    same order, then the optimizer step and ``cbn_plugin.step``. In the training
    pass every micro-batch is normalised with the whole step's statistics (its own,
    live, and the other micro-batches' from this pass), pooled with the window: one
    extra forward per micro-batch buys what the large batch would normalise with.
    """
    layers = [(n, m) for n, m in model.named_modules() if _is_cbn(m)]
    other = [f'{n} ({m.accumulation!r})' for n, m in layers if m.accumulation != 'two_pass']
    if other:
        raise ValueError("statistics_pass is for CBN layers with accumulation='two_pass'; "
                         f"these have another: {', '.join(other)}")
    for _, layer in layers:
        layer.begin_statistics_pass()
    try:
        with torch.no_grad():
            yield
    finally:
        for _, layer in layers:
            layer.end_statistics_pass()


def cbn_layers(model: nn.Module):
    """``(name, layer)`` for every CBN layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if _is_cbn(m)]
