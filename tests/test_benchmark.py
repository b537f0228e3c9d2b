"""The benchmark's reference implementation of the authors' layer is the same
algorithm as CBN, so the speed comparison in docs/benchmarks.md is like for like."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cbn_plugin
from oracle import sgd_in_lockstep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tools' / 'analysis_tools'))
import benchmark  # noqa: E402


def _pair(norm):
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    return nn.Sequential(conv, norm, nn.ReLU(), nn.Conv2d(6, 2, 1))


@pytest.mark.parametrize('window', [2, 4])
def test_authors_reference_matches_cbn_with_the_exclude_rule(window):
    """In float64 over SGD steps: same outputs, gradients and running statistics as
    ``CBN(variance_rule='exclude')``, whose (mu, var) window the authors keep as
    (mu, nu, dmu/dW, dnu/dW, W)."""
    torch.manual_seed(0)
    ours = _pair(cbn_plugin.CBN(6, window_size=window, variance_rule='exclude', mode='paper')).double()
    ref = _pair(benchmark.AuthorsCBN(6, window_size=window)).double()
    ref.load_state_dict(ours.state_dict(), strict=False)
    cbn_plugin.bind(ours, logger=None)
    benchmark.attach_authors(ref)
    assert ref[1].conv is ref[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(window + 3):
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64) * 3 + 2
        out, out_ref = ours(x), ref(x)
        torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-10)
        target = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (out * target).sum().backward()
        (out_ref * target).sum().backward()
        sgd_in_lockstep(list(ours.parameters()), list(ref.parameters()), 0.05, 1e-8, 1e-10)
        cbn_plugin.step(ours)
    torch.testing.assert_close(ours[1].running_mean, ref[1].running_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours[1].running_var, ref[1].running_var, rtol=1e-9, atol=1e-12)
    # Their window holds 3 |W| per past step (+ 2 C), ours |W| + P + 2C.
    k1, w, c = window - 1, ours[0].weight.numel(), 6
    assert ref[1].window_numel() == k1 * (3 * w + 2 * c)
    assert ours[1].window_numel() == k1 * (w + 27 + 2 * c)


def test_sampled_variants_follow_the_strides_asked_for():
    cfgs = benchmark.norm_configs(window=3, strides=(2, 5))
    made = {name: benchmark.build_norm(cfg, 64) for name, cfg in cfgs.items() if cfg is not None}
    assert made['CBN default sampled s=2'].dvar_stride == 2
    assert made['CBN default sampled s=5'].dvar_stride == 5
    assert made['CBN paper'].dvar_stride == 1 and made['naive CBN'].rho == 0
    assert made['CBN paper'].stats_backward == 'current'
    assert made['CBN default'].stats_backward == 'compensated'
    assert made['CBN default, mu_nu'].compensation == 'mu_nu'


def test_cpu_peak_memory_sees_the_window():
    """The per-variant child process measures what training keeps resident: exact
    CBN's peak exceeds BN's by at least its window (float32 numbers)."""
    import argparse
    args = argparse.Namespace(window=2, image=64, rois_per_image=16, threads=1,
                              dvar_strides=[2], peak_memory=True)
    cpu = torch.device('cpu')
    peaks = {name: benchmark.peak_memory(name, None, args, cpu) for name in ('BN', 'CBN paper')}
    model, step = benchmark.detector_step('CBN paper', args, cpu)
    for _ in range(args.window + 1):
        step()
    window_mib = benchmark.window_numel(model) * 4 / 2 ** 20
    assert window_mib > 10
    assert peaks['CBN paper'] - peaks['BN'] >= window_mib, (peaks, window_mib)
