"""The MMEngine internals ``cbn_plugin.mmengine_internals`` reads are where it reads them.

Each check builds or inspects the installed MMEngine's own objects, so an
MMEngine release that renames an attribute or changes the behaviour relied on
fails here, by name.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from mmengine.dist import master_only
from mmengine.hooks import CheckpointHook
from mmengine.runner import IterBasedTrainLoop, Runner

from cbn_plugin import mmengine_internals as internals
from cbn_plugin.engine import encode_checkpoint
from helpers import ToyNet, tiny_runner

pytestmark = pytest.mark.usefixtures('keep_default_scope')


@pytest.mark.parametrize('counts', [1, 3])
def test_accumulative_counts_is_the_configured_count(tmp_path, counts):
    runner = tiny_runner(tmp_path, accumulate=counts)
    wrapper = runner.build_optim_wrapper(runner.optim_wrapper)  # what train() builds
    assert internals.accumulative_counts(wrapper) == counts


@pytest.mark.parametrize('resume, load_from', [(False, None), (False, 'a.pth'),
                                               (True, None), (True, 'b.pth')])
def test_resume_and_load_from_are_the_constructor_arguments(tmp_path, resume, load_from):
    runner = tiny_runner(tmp_path)
    built = Runner(model=ToyNet(), work_dir=str(tmp_path / 'w'), resume=resume,
                   load_from=load_from, experiment_name=f'{tmp_path.name}_{resume}_{load_from}')
    assert internals.runner_resumes(built) is resume
    assert internals.runner_load_from(built) == load_from
    assert internals.runner_resumes(runner) is False


def test_resumed_iteration_loop_replays_through_dataloader_iterator(tmp_path):
    """IterBasedTrainLoop resumed at iteration i pulls i batches from ``dataloader_iterator``
    after ``before_train``, so the callback runs after exactly those batches."""
    runner = tiny_runner(tmp_path, max_iters=6)
    loop = runner.train_loop
    assert isinstance(loop, IterBasedTrainLoop)
    assert internals.run_after_resume_replay(loop, lambda: None) is False  # iteration 0
    source = inspect.getsource(IterBasedTrainLoop.run)
    assert "call_hook('before_train')" in source
    assert source.index("call_hook('before_train')") < source.index(
        'next(self.dataloader_iterator)')
    loop._iter = 3  # what Runner.resume sets (the public loop.iter reads it)
    assert loop.iter == 3
    pulled, called_at = [], []

    def batches():
        for i in range(10):
            pulled.append(i)
            yield i

    loop.dataloader_iterator = batches()
    assert internals.run_after_resume_replay(loop, lambda: called_at.append(len(pulled)))
    assert [next(loop.dataloader_iterator) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert called_at == [3]  # once, right after the 3 replayed batches


def test_save_checkpoint_is_master_only_and_called_on_every_rank():
    """Why the kit wraps the method: ``Runner.save_checkpoint`` is ``master_only`` (its
    ``before_save_checkpoint`` stage runs on rank 0 alone) while ``CheckpointHook``
    calls ``runner.save_checkpoint`` on every rank."""
    assert Runner.save_checkpoint.__code__ is master_only(lambda: None).__code__
    assert 'runner.save_checkpoint(' in inspect.getsource(CheckpointHook)


def test_has_loaded_is_set_by_load_or_resume(tmp_path):
    """``Runner.load_or_resume`` reads and sets ``_has_loaded`` (load once, then skip)."""
    runner = tiny_runner(tmp_path)
    assert internals.runner_has_loaded(runner) is False
    source = inspect.getsource(Runner.load_or_resume)
    assert 'if self._has_loaded:' in source and 'self._has_loaded = True' in source
    runner.save_checkpoint(str(tmp_path), 'x.pth', save_optimizer=False,
                           save_param_scheduler=False)
    # Weights_only-loadable (MMEngine's own file is not, with torch's default).
    path = tmp_path / 'x.pth'
    torch.save(encode_checkpoint(torch.load(path, weights_only=False)), path)
    runner.load_checkpoint(str(path), map_location='cpu')
    assert internals.runner_has_loaded(runner) is True


def test_wrap_save_checkpoint_chains_in_order_once_and_undo(tmp_path):
    """Every key wraps once, the chain's order is ``SAVE_CHECKPOINT_WRAPS`` (innermost
    first) whatever order the wraps come in, and unwrapping one keeps the others."""
    runner = tiny_runner(tmp_path)
    calls = []

    def recording(key):
        def wrap(save):
            def save_checkpoint(*args, **kwargs):
                calls.append(key)
                return save(*args, **kwargs)
            return save_checkpoint
        return wrap

    owners = {key: object() for key in internals.SAVE_CHECKPOINT_WRAPS}
    for key in reversed(internals.SAVE_CHECKPOINT_WRAPS):
        assert internals.wrap_save_checkpoint(runner, key, recording(key), owners[key])
    assert not internals.wrap_save_checkpoint(runner, 'atomic', recording('again'))  # once
    with pytest.raises(ValueError, match="key 'atomc': must be one of"):
        internals.wrap_save_checkpoint(runner, 'atomc', recording('x'))
    assert internals.save_checkpoint_wraps(runner) == internals.SAVE_CHECKPOINT_WRAPS
    no_optimizer = dict(save_optimizer=False, save_param_scheduler=False)
    runner.save_checkpoint(str(tmp_path), 'x.pth', **no_optimizer)
    # The outermost runs first: rng, then rank_states, then atomic around the write.
    assert calls == list(reversed(internals.SAVE_CHECKPOINT_WRAPS))
    assert (tmp_path / 'x.pth').exists()
    assert 'state_dict' in torch.load(tmp_path / 'x.pth', weights_only=False)
    internals.unwrap_save_checkpoint(runner, 'rank_states', owner=object())  # not its owner
    assert internals.save_checkpoint_wraps(runner) == internals.SAVE_CHECKPOINT_WRAPS
    internals.unwrap_save_checkpoint(runner, 'rank_states', owner=owners['rank_states'])
    assert internals.save_checkpoint_wraps(runner) == ('atomic', 'rng')
    calls.clear()
    runner.save_checkpoint(str(tmp_path), 'y.pth', **no_optimizer)
    assert calls == ['rng', 'atomic']
    internals.unwrap_save_checkpoint(runner)
    assert 'save_checkpoint' not in runner.__dict__
    runner.save_checkpoint(str(tmp_path), 'z.pth', **no_optimizer)
    assert calls == ['rng', 'atomic'] and (tmp_path / 'z.pth').exists()


def test_wrap_keeps_a_patch_made_before_it(tmp_path):
    """A ``save_checkpoint`` someone else put on the Runner first stays inside the chain
    and is given back when the last wrap goes."""
    runner = tiny_runner(tmp_path)
    seen = []
    original = runner.save_checkpoint

    def patched(*args, **kwargs):
        seen.append('patch')
        return original(*args, **kwargs)

    runner.save_checkpoint = patched
    internals.wrap_save_checkpoint(runner, 'atomic', lambda save: save)
    runner.save_checkpoint(str(tmp_path), 'x.pth', save_optimizer=False,
                           save_param_scheduler=False)
    assert seen == ['patch']
    internals.unwrap_save_checkpoint(runner)
    assert runner.__dict__['save_checkpoint'] is patched
