"""A CBN layer built without a ``window_size``: CBNHook derives it from the images per
optimizer step (``window_images``, k = 32 / images by default, the window the detection
study's sweep measured best); a checkpoint restores the length it was trained with; a
given ``window_size`` is kept, and a state of another length is refused by name.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin import CBN
from helpers import ToyData, ToyNet, tiny_runner


def _train(work_dir, window_size=None, accumulate=1, **hook):
    torch.manual_seed(0)
    model = ToyNet(window_size=window_size)
    runner = tiny_runner(work_dir, model, ToyData(8), max_iters=4, accumulate=accumulate,
                         hooks=[dict(type='CBNHook', burn_in_iters=0, **hook)],
                         default_hooks=dict(checkpoint=None))
    runner.train()
    return model


def test_a_layer_without_window_size_pools_four_on_its_own():
    layer = CBN(8)
    assert (layer.window_size, layer.window_size_given) == (4, False)
    assert CBN(8, window_size=4).window_size_given


@pytest.mark.parametrize('accumulate, hook, window', [
    (1, {}, 16),                           # 32 images / 2 per step
    (2, {}, 8),                            # 2 x 2 accumulated: 4 per step
    (1, dict(window_images=8), 4),
    (1, dict(window_images=2), 2),         # never below 2
    (1, dict(window_images=None), 4)])     # not derived: the layer's own
def test_cbn_hook_derives_the_window_from_the_images_per_step(tmp_path, accumulate, hook,
                                                              window):
    model = _train(tmp_path, accumulate=accumulate, **hook)
    assert model.bn.window_size == window
    assert model.bn.window_mean.shape[1] == window - 1  # it pooled that window


def test_the_rule_is_public_and_checks_its_inputs():
    """``cbn_plugin.derived_window_size``: the hook's rule, which the studies use too."""
    rule = cbn_plugin.derived_window_size
    assert [rule(n) for n in (1, 2, 3, 4, 8, 16, 24, 64)] == [32, 16, 11, 8, 4, 2, 2, 2]
    assert rule(4, window_images=64) == 16
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match='images_per_step'):
            rule(bad)
    with pytest.raises(ValueError, match='window_images'):
        rule(2, window_images=0)


def test_a_given_window_size_is_kept(tmp_path):
    assert _train(tmp_path, window_size=3).bn.window_size == 3


def test_a_checkpoint_restores_the_derived_window_and_refuses_another(tmp_path):
    trained = _train(tmp_path)
    fresh = ToyNet(window_size=None)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.bn.window_size == 16
    for name in ('window_mean', 'window_grad_var'):
        assert torch.equal(getattr(fresh.bn, name), getattr(trained.bn, name))
    given = ToyNet(window_size=4)
    with pytest.raises(RuntimeError, match=r'bn.window_\*: the state holds a window of 16 '
                                           r'steps, this layer pools window_size=4'):
        given.load_state_dict(trained.state_dict())


def test_set_window_size_only_before_the_first_step():
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), CBN(3))
    model[1].set_window_size(6)
    cbn_plugin.bind(model, logger=None)
    model(torch.randn(2, 2, 3, 3)).sum().backward()
    cbn_plugin.step(model)
    assert model[1].window_mean.shape[1] == 5
    with pytest.raises(RuntimeError, match=r'set_window_size\(3\) after the layer has '
                                           r'recorded steps \(window_size=6\)'):
        model[1].set_window_size(3)
    with pytest.raises(ValueError, match='window_images must be an integer >= 1'):
        cbn_plugin.CBNHook(burn_in_iters=0, window_images=0)
