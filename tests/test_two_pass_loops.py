"""The two-pass training loops (``cbn_plugin/loops.py``) in an MMEngine Runner.

The oracle is the layer's: when the CBN layer's input does not depend on another norm
(ToyNet: a conv fed by the data), a two-pass step of A micro-batches of 2 images trains
exactly like one iteration of 2A images, so the Runner with a two-pass loop and
``accumulative_counts=A`` must end with the weights, running statistics and window of the
Runner at batch 2A without accumulation. With ``'merge'`` it must not.
"""
from __future__ import annotations

import pytest
import torch

import cbn_plugin
from cbn_plugin.loops import Lookahead
from helpers import ToyData, ToyNet, tiny_runner


def _trained(work_dir, accumulation='two_pass', batch_size=2, accumulate=2, loop=None,
             data=16, **kw):
    torch.manual_seed(0)
    model = ToyNet(window_size=2)
    model.bn.accumulation = accumulation
    runner = tiny_runner(work_dir, model, ToyData(data, shift=0.5), shuffle=False, lr=0.05,
                         momentum=0.9, hooks=[dict(type='CBNHook', burn_in_iters=0)], batch_size=batch_size,
                         accumulate=accumulate, loop=loop, default_hooks=dict(checkpoint=None),
                         **kw)
    runner.train()
    return model


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if key != 'bn.num_batches_tracked':  # counts forwards: 2 per step against 1
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize('loop, length', [('TwoPassIterBasedTrainLoop', dict(max_iters=8)),
                                          ('TwoPassEpochBasedTrainLoop', dict(max_epochs=2))])
def test_two_pass_loop_trains_like_the_large_batch(tmp_path, loop, length):
    split = _trained(tmp_path / 'split', loop=loop, **length)
    large = {k: v // 2 for k, v in length.items() if k == 'max_iters'} or length
    whole = _trained(tmp_path / 'whole', accumulation='merge', batch_size=4, accumulate=1,
                     **large)
    assert split.bn.steps_done == whole.bn.steps_done == whole.forwards
    _assert_same(split, whole)
    assert split.forwards == 2 * 2 * whole.forwards  # two micro-batches, two passes each


def test_merge_under_the_same_loop_is_not_the_large_batch(tmp_path):
    """The control: the oracle tells a two-pass step from 'merge'."""
    merge = _trained(tmp_path / 'merge', accumulation='merge', loop='TwoPassIterBasedTrainLoop',
                     max_iters=8)
    whole = _trained(tmp_path / 'whole', accumulation='merge', batch_size=4, accumulate=1,
                     max_iters=4)
    with pytest.raises(AssertionError):
        _assert_same(merge, whole)
    assert merge.forwards == 8  # no statistics pass for a 'merge' layer


def test_a_step_cut_by_the_epoch_end_gets_a_pass_for_each_part(tmp_path):
    """6 iterations per epoch, 4 per step: steps are cut at each epoch's end."""
    model = _trained(tmp_path / 'cut', accumulate=4, loop='TwoPassEpochBasedTrainLoop',
                     max_epochs=2, data=12)
    assert model.bn.steps_done == 3 and model.forwards == 2 * 12


def test_cbn_hook_refuses_two_pass_layers_under_another_loop(tmp_path):
    with pytest.raises(ValueError, match=r"accumulation='two_pass', which needs a statistics "
                                         r'pass .* the train loop is a EpochBasedTrainLoop'):
        _trained(tmp_path / 'plain', max_epochs=1)


def test_lookahead_keeps_every_item_in_order():
    ahead = Lookahead(iter(range(5)))
    assert next(ahead) == 0
    assert ahead.peek(2) == [1, 2] and ahead.peek(9) == [1, 2, 3, 4]
    assert list(ahead) == [1, 2, 3, 4]
    assert ahead.peek(1) == []


def test_loops_are_registered():
    from mmengine.registry import LOOPS
    for name in ('TwoPassEpochBasedTrainLoop', 'TwoPassIterBasedTrainLoop'):
        assert LOOPS.get(name) is getattr(cbn_plugin.loops, name)


def test_a_two_pass_run_resumes_exactly(tmp_path):
    """Resumed at an epoch's end (a step's end), a two-pass run ends bit-exact where the
    uninterrupted run does."""
    def run(work_dir, epochs, resume_from=None):
        torch.manual_seed(0)
        model = ToyNet(window_size=2)
        model.bn.accumulation = 'two_pass'
        tiny_runner(work_dir, model, ToyData(8, shift=0.5), shuffle=False, lr=0.05,
                    momentum=0.9, accumulate=2, loop='TwoPassEpochBasedTrainLoop',
                    max_epochs=epochs, resume_from=resume_from, randomness=dict(seed=0),
                    hooks=[dict(type='CBNHook', burn_in_iters=0),
                           dict(type='WeightsOnlyCheckpointHook')]).train()
        return model
    whole = run(tmp_path / 'whole', 2)
    run(tmp_path / 'part', 1)
    resumed = run(tmp_path / 'resumed', 2, resume_from=str(tmp_path / 'part' / 'epoch_1.pth'))
    assert resumed.bn.steps_done == whole.bn.steps_done == 4
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
