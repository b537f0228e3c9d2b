"""The networks of the study (SmallCNN, SmallResNet, OneConv) and the norm each row swaps in."""
from __future__ import annotations

import inspect

import torch.nn.functional as F
from torch import nn

from cbn_plugin.layer import MODES
from cbn_plugin.options import DEFAULT_WINDOW_SIZE
from cbn_plugin.layer import CrossIterationBatchNorm2d as CBN

EPS = 1e-5


def _layer_defaults() -> dict:
    """The CBN constructor's defaults, with its ``mode`` preset and its window resolved."""
    params = inspect.signature(CBN.__init__).parameters
    out = {k: params[k].default for k in ('window_size', 'rho', 'variance_rule',
                                          'accumulation', 'momentum')}
    out.update(MODES[params['mode'].default])
    if out['window_size'] is None:  # not given: what the layer pools without CBNHook
        out['window_size'] = DEFAULT_WINDOW_SIZE
    return out


LAYER_DEFAULTS = _layer_defaults()
# spec key -> CBN argument
SPEC_ARGS = (('rho', 'rho'), ('backward', 'stats_backward'), ('compensation', 'compensation'),
             ('running_stats', 'running_stats'), ('variance_rule', 'variance_rule'),
             ('accumulation', 'accumulation'), ('momentum', 'momentum'))


def cbn_kwargs(spec: dict) -> dict:
    """The arguments a CBN row passes: only those that differ from the layer's defaults.

    A row whose options are the defaults is built as ``CBN(c, window_size=k)`` (the layer
    users get with ``norm_cfg=dict(type='CBN', window_size=k)``); ``plain`` rows as
    ``CBN(c)`` (``dict(type='CBN')``).
    """
    if spec.get('plain'):
        return {}
    kwargs = {'window_size': spec['window']}
    for key, arg in SPEC_ARGS:
        if key in spec and spec[key] != LAYER_DEFAULTS[arg]:
            kwargs[arg] = spec[key]
    return kwargs


def make_norm(spec: dict, channels: int) -> nn.Module:
    kind = spec['kind']
    if kind == 'bn':
        return nn.BatchNorm2d(channels)
    if kind == 'gn':
        return nn.GroupNorm(min(8, channels), channels)
    if kind == 'cbn':
        return CBN(channels, **cbn_kwargs(spec))
    raise ValueError(f'unknown norm {kind!r}')


class SmallCNN(nn.Module):
    """conv3x3-norm-ReLU blocks (bias-free convs), global average pool, linear."""

    def __init__(self, spec, widths=(16, 32, 64), strides=(1, 2, 1)):
        super().__init__()
        layers, cin = [], 1
        for w, s in zip(widths, strides):
            layers += [nn.Conv2d(cin, w, 3, s, 1, bias=False), make_norm(spec, w),
                       nn.ReLU(inplace=True)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, spec, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = make_norm(spec, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = make_norm(spec, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            make_norm(spec, cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class SmallResNet(nn.Module):
    """ResNet-style: stem conv+norm, then one basic block per stage; EVERY norm is swapped.

    Widths 16, 32, 64, strides 1, 2, 1 (on 4x4 inputs: maps 4x4, 4x4, 2x2, 2x2); 9 norm
    layers, the first one right after the stem conv, three in projection shortcuts.
    """

    def __init__(self, spec, widths=(16, 32, 64), strides=(1, 2, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = make_norm(spec, widths[0])
        blocks, cin = [], widths[0]
        for w, s in zip(widths, strides):
            blocks.append(BasicBlock(spec, cin, w, s))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layers(x).mean((2, 3)))


class OneConv(nn.Module):
    """A single conv + norm (the analysis oracle: CBN's truncation is then exact)."""

    def __init__(self, spec, width=8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                      make_norm(spec, width), nn.ReLU(inplace=True))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


ARCHS = {'cnn': SmallCNN, 'resnet': SmallResNet, 'oneconv': OneConv}
