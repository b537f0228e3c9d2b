"""'CBN' through mmcv's builders, BN checkpoints, and binding in mmdet's models."""
import pytest
import torch
from mmcv.cnn import ConvModule, build_norm_layer
from mmdet.models.backbones import ResNet, ResNeXt
from mmdet.models.necks import FPN
from torch import nn

import cbn_plugin
from cbn_plugin import CBN


def test_build_norm_layer_gives_bn_abbreviation_and_forwards_arguments():
    name, layer = build_norm_layer(dict(type='CBN', window_size=2, rho=0.5), 64, postfix=1)
    assert name == 'bn1' and isinstance(layer, CBN)
    assert (layer.num_features, layer.window_size, layer.rho) == (64, 2, 0.5)
    _, frozen = build_norm_layer(dict(type='CBN', requires_grad=False), 8)
    assert not frozen.weight.requires_grad


def test_fresh_state_dict_is_batchnorm_and_bn_checkpoint_loads_strictly():
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.running_mean.uniform_()
    bn.num_batches_tracked += 7
    cbn = CBN(16)
    assert list(cbn.state_dict()) == list(bn.state_dict())
    cbn.load_state_dict(bn.state_dict(), strict=True)
    for name, value in bn.state_dict().items():
        assert torch.equal(cbn.state_dict()[name], value)


def trained_conv_module(steps, **cbn):
    torch.manual_seed(0)
    module = ConvModule(3, 8, 3, padding=1, norm_cfg=dict(type='CBN', **cbn))
    cbn_plugin.bind(module, logger=None)
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(8, 1, 1, generator=gen)
    losses = []
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8, generator=gen)
        loss = (module(x).mean(dim=(2, 3)) - target.view(1, -1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        cbn_plugin.step(module)
        losses.append(float(loss))
    return module, opt, losses


def test_conv_module_with_cbn_trains():
    module, _, losses = trained_conv_module(40, window_size=4)
    assert module.norm.diagnostics['window'] == 4
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_window_state_round_trips_through_state_dict():
    """A fresh layer restores the window from a state_dict, and continues bit-exactly."""
    module, opt, _ = trained_conv_module(5, window_size=3)
    state = module.state_dict()
    assert {'bn.window_mean', 'bn.window_grad_var', 'bn.num_steps'} <= set(state)
    fresh = ConvModule(3, 8, 3, padding=1, norm_cfg=dict(type='CBN', window_size=3))
    fresh.load_state_dict(state, strict=True)
    cbn_plugin.bind(fresh, logger=None)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)
    # A checkpoint without window state (BN) resets the window rather than mixing weights.
    bn_state = {k: v for k, v in state.items() if '.window' not in k and 'num_steps' not in k}
    fresh.load_state_dict(bn_state, strict=True)
    assert fresh.norm.window_mean is None and fresh.norm.steps_done == 0


def norm_pairs(model):
    return dict(cbn_plugin.bind(model, logger=None))


@pytest.mark.parametrize('make', [
    lambda cfg: ResNet(depth=18, norm_cfg=cfg, norm_eval=False),
    lambda cfg: ResNet(depth=50, deep_stem=True, avg_down=True, norm_cfg=cfg, norm_eval=False),
    lambda cfg: ResNeXt(depth=50, groups=32, base_width=4, norm_cfg=cfg, norm_eval=False),
], ids=['resnet18', 'resnet50-v1d', 'resnext50'])
def test_bind_pairs_every_norm_of_mmdet_backbones(make):
    model = make(dict(type='CBN', window_size=2))
    pairs = norm_pairs(model)
    norms = [n for n, m in model.named_modules() if isinstance(m, CBN)]
    assert sorted(pairs) == sorted(norms) and all(pairs.values())
    modules = dict(model.named_modules())
    for norm, conv in pairs.items():
        assert modules[conv].out_channels == modules[norm].num_features
    # Spot checks of the structure: the stem, a block and a downsample path.
    assert pairs.get('bn1', pairs.get('stem.1')) in ('conv1', 'stem.0')
    assert pairs['layer1.0.bn2'] == 'layer1.0.conv2'
    downsample = [n for n in pairs if 'layer2.0.downsample' in n]
    assert len(downsample) == 1 and pairs[downsample[0]].startswith('layer2.0.downsample.')
    # And it trains: every bound layer runs the verified conv -> norm path.
    model.train()
    for _ in range(2):
        model(torch.randn(2, 3, 32, 32))[-1].mean().backward()
        cbn_plugin.step(model)
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out[-1]).all() and modules[norms[-1]].diagnostics['window'] == 2


def test_norm_eval_puts_backbone_cbn_in_eval():
    model = ResNet(depth=18, norm_cfg=dict(type='CBN'), norm_eval=True)
    cbn_plugin.bind(model, logger=None)
    model.train()
    cbns = [m for m in model.modules() if isinstance(m, CBN)]
    assert cbns and not any(m.training for m in cbns)
    model(torch.randn(1, 3, 32, 32))
    assert all(m.window_mean is None for m in cbns)


def test_bind_fpn_and_heads():
    fpn = FPN([16, 32, 64, 128], 32, 4, norm_cfg=dict(type='CBN'))
    pairs = norm_pairs(fpn)
    assert len(pairs) == 8
    assert pairs['lateral_convs.0.bn'] == 'lateral_convs.0.conv'
    assert pairs['fpn_convs.3.bn'] == 'fpn_convs.3.conv'


def test_conv_module_with_norm_before_conv_is_refused():
    module = nn.Sequential(ConvModule(8, 8, 3, norm_cfg=dict(type='CBN'),
                                      order=('norm', 'conv', 'act')))
    with pytest.raises(ValueError, match=r"CBN '0.bn' .* has no conv directly before it"):
        cbn_plugin.bind(module, logger=None)
    naive = ConvModule(8, 8, 3, norm_cfg=dict(type='CBN', rho=0.0), order=('norm', 'conv', 'act'))
    assert cbn_plugin.bind(naive, logger=None) == [('bn', None)]


def test_explicit_pairs_for_custom_layouts():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.project = nn.Conv2d(3, 4, 1, bias=False)
            self.normalise = CBN(4, window_size=2)

        def forward(self, x):
            return self.normalise(self.project(x))

    model = Custom()
    with pytest.raises(ValueError, match='normalise'):
        cbn_plugin.bind(model, logger=None)
    assert cbn_plugin.bind(model, pairs={'normalise': 'project'}, logger=None) == [
        ('normalise', 'project')]
    for _ in range(2):
        model(torch.randn(2, 3, 4, 4)).sum().backward()
        cbn_plugin.step(model)
    model(torch.randn(2, 3, 4, 4))
    assert model.normalise.diagnostics['window'] == 2


def test_core_package_never_imports_the_engine():
    """``import cbn_plugin`` and a ``recompute_statistics`` call register the layers and
    their hooks only: the checkpoint kit (``cbn_plugin.engine``) stays out."""
    import subprocess
    import sys
    code = '''
import sys
import torch
import cbn_plugin
from mmengine.registry import HOOKS
net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), cbn_plugin.CBN(2, window_size=2))
cbn_plugin.bind(net)
cbn_plugin.recompute_statistics(net, [torch.randn(2, 1, 5, 5) for _ in range(3)], 3)
engine = sorted(m for m in sys.modules if m.startswith('cbn_plugin.engine'))
assert not engine, engine
for name in ('WeightsOnlyCheckpointHook', 'CheckpointFileCheckHook', 'AtomicCheckpointHook',
             'RankStateHook', 'ResumeRNGHook', 'CheckpointCodecHook'):
    assert HOOKS.get(name) is None, name
assert HOOKS.get('CBNHook') is cbn_plugin.CBNHook
'''
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
