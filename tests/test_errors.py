"""Bad arguments and missing or wrong bindings fail loudly, naming what is wrong."""
import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import CBN, CBNHook


@pytest.mark.parametrize('kwargs, match', [
    (dict(window_size=0), r'window_size must be an integer >= 1 .* got 0'),
    (dict(window_size=2.5), r'window_size .* got 2.5'),
    (dict(window_size=True), r'window_size .* got True'),
    (dict(rho=-0.1), r'rho must be a number in \[0, 1\] .* got -0.1'),
    (dict(rho=1.5), r'rho .* got 1.5'),
    (dict(rho='1'), r"rho .* got '1'"),
    (dict(variance_rule='drop'), r"variance_rule must be one of \('clamp', 'exclude'\), got 'drop'"),
    (dict(running_stats='ema'), r"running_stats must be one of \('batch', 'window'\), got 'ema'"),
    (dict(per_call_windows='yes'), r"per_call_windows must be True or False, got 'yes'"),
    (dict(dvar_stride=0), r'dvar_stride must be an integer >= 1 \(1 is exact\), got 0'),
    (dict(stats_backward='window'), r"stats_backward must be one of \('current', 'pooled', 'compensated'\), got 'window'"),
    (dict(compensation='nu'), r"compensation must be one of \('mu_nu', 'var'\), got 'nu'"),
    (dict(mode='authors'), r"mode must be one of \('default', 'paper'\), got 'authors'"),
    (dict(eps=0), r'eps must be > 0, got 0'),
        (dict(accumulation='sum'), r"accumulation must be one of \('merge', 'own', 'two_pass'\), got 'sum'"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CBN(8, **kwargs)


def test_unbound_layer_raises_at_first_training_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), CBN(4, window_size=2))
    model.eval()
    model(torch.randn(2, 3, 4, 4))  # eval is BN: fine
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 4, 4))  # no_grad is BN: fine
    with pytest.raises(RuntimeError, match=r'never bound: call cbn_plugin.bind\(model\).*CBNHook'):
        model(torch.randn(2, 3, 4, 4))
    # A window of one is BN and needs no binding.
    nn.Sequential(nn.Conv2d(3, 4, 1), CBN(4, window_size=1))(torch.randn(2, 3, 4, 4))


def test_cbn_without_conv_is_refused_by_bind():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), CBN(4, window_size=2))
    with pytest.raises(ValueError, match=r"CBN '2' .*no conv directly before it"):
        cbn_plugin.bind(model, logger=None)
    naive = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), CBN(4, window_size=2, rho=0.0))
    assert cbn_plugin.bind(naive, logger=None) == [('2', None)]


def test_channel_mismatch_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), CBN(16))
    with pytest.raises(ValueError, match=r"CBN '1' has 16 channels but its conv '0' has "
                                         r'out_channels=8'):
        cbn_plugin.bind(model, logger=None)


def test_non_standard_conv_is_refused():
    class StandardisedConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / self.weight.std()
            return self._conv_forward(x, w, self.bias)

    with pytest.raises(TypeError, match=r"'0' \(StandardisedConv\), whose forward differs"):
        cbn_plugin.bind(nn.Sequential(StandardisedConv(3, 4, 1), CBN(4)), logger=None)
    with pytest.raises(TypeError, match=r'not an nn.Conv2d'):
        cbn_plugin.bind(nn.Sequential(nn.Conv1d(3, 4, 1), CBN(4)), pairs={'1': '0'}, logger=None)


def test_input_not_from_bound_conv_is_detected_at_run_time():
    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 1)
            self.bn1 = CBN(4, window_size=2)

        def forward(self, x):
            return self.bn1(self.conv1(x) + 1)   # something between conv and norm

    model = Wrong()
    cbn_plugin.bind(model, logger=None)
    with pytest.raises(RuntimeError, match=r"bound to conv 'conv1' but its input is not"):
        model(torch.randn(2, 3, 4, 4))


def test_bad_pairs_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), CBN(4))
    with pytest.raises(KeyError, match="no conv named 'missing'"):
        cbn_plugin.bind(model, pairs={'1': 'missing'}, logger=None)
    with pytest.raises(TypeError, match="'0' is a Conv2d, not a CBN layer"):
        cbn_plugin.bind(model, pairs={'0': '0'}, logger=None)


def test_input_must_be_4d():
    with pytest.raises(ValueError, match='4D'):
        CBN(4)(torch.randn(2, 4, 3))


@pytest.mark.parametrize('kwargs, match', [
    (dict(), 'exactly one of burn_in_epochs or burn_in_iters'),
    (dict(burn_in_epochs=8, burn_in_iters=100), r'exactly one .*burn_in_epochs=8, burn_in_iters=100'),
    (dict(burn_in_epochs=-1), r'CBNHook burn_in_epochs must be a number >= 0, got -1'),
    (dict(burn_in_epochs=float('inf')), r'burn_in_epochs must be a number >= 0, got inf'),
    (dict(burn_in_iters=1.5), r'CBNHook burn_in_iters must be an integer >= 0, got 1.5'),
    (dict(burn_in_iters=0, ramp_iters=-2), r'ramp_iters must be an integer >= 0, got -2'),
])
def test_hook_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CBNHook(**kwargs)


def test_sync_shift_must_match_the_channels():
    layer = cbn_plugin.SyncCrossIterationBatchNorm2d(4)
    assert layer.stats_shift is None
    with pytest.raises(ValueError, match=r'stats_shift must have shape \(4,\), got \(3,\)'):
        layer.stats_shift = torch.zeros(3)
    layer.stats_shift = torch.ones(4)
    assert torch.equal(layer.stats_shift, torch.ones(4))
