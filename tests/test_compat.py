"""``cbn_plugin.compat``: the torch calls that differ across the supported range.

Each shim is checked for what it means, not for which branch it took, so the
same tests hold on the newest torch (``make test``, the native API) and on the
oldest (``make test-oldest``, torch 2.1.2: the older form). A training step of
the layer in both modes and under autocast reaches each call site. The plugin
calls the shimmed APIs nowhere else (a static check that fails on the newest
torch too, where the native call would pass every other test).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import compat

PACKAGE = Path(cbn_plugin.__file__).resolve().parent
# The native calls compat.py wraps: each is missing, or takes other arguments, on part of
# the supported range (torch 2.1 has neither is_fx_symbolic_tracing nor the device argument).
WRAPPED = {
    'is_fx_symbolic_tracing': re.compile(r'_symbolic_trace\.is_fx_symbolic_tracing\b'),
    'is_autocast_enabled': re.compile(r'torch\.is_autocast_enabled\('),
}


def test_shimmed_calls_go_through_compat_only():
    offenders = [f'{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}'
                 for path in sorted(PACKAGE.rglob('*.py')) if path.name != 'compat.py'
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 for pattern in WRAPPED.values() if pattern.search(line)]
    assert not offenders, ('call cbn_plugin.compat instead (these differ across the '
                           f'supported torch range): {offenders}')


class _Probe(nn.Module):
    """Records what the shim answers while its forward runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(compat.is_fx_symbolic_tracing())
        return x + 1


def test_is_fx_symbolic_tracing_only_under_symbolic_trace():
    probe = _Probe()
    probe(torch.zeros(1))
    torch.fx.symbolic_trace(probe)
    probe(torch.zeros(1))
    assert probe.seen == [False, True, False]


def test_is_autocast_enabled_answers_for_the_device_asked():
    assert not compat.is_autocast_enabled('cpu')
    # bfloat16: torch 2.1's CPU autocast knows no other dtype (it disables itself for float16).
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert compat.is_autocast_enabled('cpu')
        # CPU autocast is not CUDA's (torch < 2.4's argument-less call answers for CUDA).
        assert not compat.is_autocast_enabled('cuda')
        with torch.autocast('cpu', enabled=False):
            assert not compat.is_autocast_enabled('cpu')
    assert not compat.is_autocast_enabled('cpu')


def _conv_cbn(**cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    model = nn.Sequential(conv, cbn_plugin.CrossIterationBatchNorm2d(4, window_size=3, **cfg))
    cbn_plugin.bind(model)
    return model


@pytest.mark.parametrize('mode', ['default', 'paper'])
@pytest.mark.parametrize('autocast', [False, True])
def test_layer_trains_and_traces_on_this_torch(mode, autocast):
    """The issue's report (torch 2.1.2): the first training forward of a conv + CBN stack
    failed in both modes. Steps past the window's start reach ``pool_compensated``;
    eval mode then traces with ``torch.fx``."""
    model = _conv_cbn(**({} if mode == 'default' else {'mode': 'paper'}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cbn_plugin.step(model)
    assert torch.isfinite(loss)
    assert model[1].running_var.dtype == torch.float32
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
