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


def test_wrap_save_checkpoint_once_and_undo(tmp_path):
    runner = tiny_runner(tmp_path)
    calls = []

    def wrap(save):
        def counting(*args, **kwargs):
            calls.append(args)
            return save(*args, **kwargs)
        return counting

    assert internals.wrap_save_checkpoint(runner, wrap) is True
    assert internals.wrap_save_checkpoint(runner, wrap) is False  # wrapped once only
    assert internals.wrap_save_checkpoint(runner, lambda save: save) is False
    runner.save_checkpoint(str(tmp_path), 'x.pth', save_optimizer=False,
                           save_param_scheduler=False)
    assert len(calls) == 1 and (tmp_path / 'x.pth').exists()
    assert 'state_dict' in torch.load(tmp_path / 'x.pth', weights_only=False)
    internals.unwrap_save_checkpoint(runner)
    assert 'save_checkpoint' not in runner.__dict__
    runner.save_checkpoint(str(tmp_path), 'y.pth', save_optimizer=False,
                           save_param_scheduler=False)
    assert len(calls) == 1
