"""CBNHook inside a real mmengine Runner, on a toy model (fast; detectors are in the e2e test)."""
import pytest
import torch
import torch.nn.functional as F

from helpers import ToyData, ToyNet, tiny_runner


def make_runner(tmp_path, hook=dict(burn_in_epochs=1), accumulate=1, max_epochs=3,
                max_iters=None, model=None):
    """12 samples at batch 2 (6 iterations an epoch), windows of 3, in order."""
    return tiny_runner(
        tmp_path, model or ToyNet(window_size=3), ToyData(n=12), shuffle=False, lr=0.05,
        momentum=0.9, accumulate=accumulate, max_epochs=max_epochs, max_iters=max_iters,
        hooks=[dict(type='CBNHook', **hook)] if hook is not None else (),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=10 ** 6),
                           logger=dict(type='LoggerHook', interval=1)),
        log_level='WARNING', default_scope='mmengine')


@pytest.mark.parametrize('accumulate', [1, 2])
def test_burn_in_epochs_become_optimizer_steps(tmp_path, accumulate):
    runner = make_runner(tmp_path, dict(burn_in_epochs=1), accumulate=accumulate)
    model = runner.model
    runner.train()
    layer = model.bn
    # 12 samples / batch 2 = 6 iterations per epoch, 18 in all.
    assert model.forwards == 18
    assert layer.burn_in_steps == 6 // accumulate
    # The window advanced once per optimizer step, not per forward.
    assert layer.steps_done == 18 // accumulate
    assert int(layer.window_filled[0]) == 2
    hub = runner.message_hub
    windows = hub.get_scalar('train/cbn_window').data[0]
    assert windows[0] == 1 and windows[-1] == 3
    # After the burn-in a training forward pools the steps before it: its output is
    # not plain BN's of the same batch.
    features = model.conv(torch.randn(2, 1, 6, 6))
    plain = F.batch_norm(features, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
    assert not torch.allclose(layer(features), plain, atol=1e-3)

def test_iteration_based_loop_and_ramp(tmp_path):
    runner = make_runner(tmp_path, dict(burn_in_iters=4, ramp_iters=4), max_iters=12)
    runner.train()
    windows = list(runner.message_hub.get_scalar('train/cbn_window').data[0])
    # Plain BN for the 4 burn-in steps, then the window ramps from 1 to 3 over 4 steps.
    assert windows[:4] == [1, 1, 1, 1]
    assert windows == [1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3]


def test_burn_in_past_the_end_of_training_is_an_error(tmp_path):
    runner = make_runner(tmp_path, dict(burn_in_epochs=3), max_epochs=3)
    with pytest.raises(ValueError, match=r'burn_in_epochs=3 is 18 optimizer steps, but training '
                                         r'has only 18'):
        runner.train()


def test_cbn_without_the_hook_is_an_error(tmp_path):
    runner = make_runner(tmp_path, hook=None)
    with pytest.raises(RuntimeError, match=r"never bound: .*dict\(type='CBNHook'\)"):
        runner.train()


def test_model_without_cbn_trains_with_the_hook(tmp_path):
    runner = make_runner(tmp_path, model=ToyNet(norm='BN'))
    runner.train()
    assert 'train/cbn_window' not in runner.message_hub.log_scalars


def test_mmengine_sync_bn_conversion_of_cbn_is_refused():
    """A config with mmengine's ``sync_bn`` and CBN layers is refused as training starts
    (mmengine would turn them into plain SyncBN); with BN it is not the hook's business."""
    from types import SimpleNamespace
    from mmengine.config import Config
    from cbn_plugin import CBNHook
    cfg = Config(dict(sync_bn='torch', model=dict(type='X', neck=dict(
        norm_cfg=dict(type='CBN')))))
    runner = SimpleNamespace(cfg=cfg, model=torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1),
                                                                torch.nn.BatchNorm2d(2)))
    with pytest.raises(ValueError, match=r"sync_bn='torch' .*\['CBN'\] layers into plain "
                                         r"SyncBN.*type='SyncCBN'"):
        CBNHook(burn_in_iters=0).before_train(runner)
    cfg.model.neck.norm_cfg.type = 'BN'
    CBNHook(burn_in_iters=0).before_train(runner)  # no CBN layer: the hook does nothing, and says so
