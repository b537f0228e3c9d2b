"""A finished distributed run exits with status 0, also on a busy machine.

A process of a gloo run can abort after all its work is done: the backend's
worker threads release each collective's tensors after the caller has been
woken, releasing a tensor Python dropped first takes the GIL, and a thread
that asks for the GIL while the interpreter finalizes is ended inside C++
frames: ``terminate called without an active exception``, SIGABRT, and the
launcher marks the finished run failed and kills the other ranks. The tools
end a finished distributed run with ``finish_distributed``
(``tools/launch_support.py``: a barrier, ``destroy_process_group``, the
``atexit`` handlers, then an exit that skips the finalization).

``bash tools/dist_train.sh`` (torchrun, 2 CPU processes, gloo) trains a toy
SyncCBN model (its forward all-reduces) for one epoch of 2 iterations,
checkpoints (every rank's state gathered to rank 0) and validates (results
gathered, metrics broadcast); a last hook then runs the collectives the abort
needs at the very end: one whose tensor Python drops as soon as it returns,
and a series left in flight that the other rank joins one by one over a
second, so they finish while the first rank ends. A CPU-bound
process runs beside the launches, so the worker threads wait for a core as
they do on a loaded machine. Each launch must exit with status 0, print no
``terminate called``, and have trained, saved and validated. ``RUNS``
launches at once (3; ``CBN_EXIT_STRESS_RUNS=N`` for more). The abort is a race, so one
launch without the ending above may pass; the launches together catch it
(see docs/checkpoints.md, Distributed runs without a GPU).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO, free_port

RUNS = int(os.environ.get('CBN_EXIT_STRESS_RUNS', '3'))

# Written next to the config and imported through custom_imports.
TOY_MODULE = '''\
"""A toy SyncCBN model, its data and metric, and a hook ending the run with collectives."""
import time

import torch
import torch.distributed as dist
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS
from torch import nn
from torch.utils.data import Dataset

import cbn_plugin


@MODELS.register_module()
class ExitToyNet(BaseModel):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = cbn_plugin.SyncCBN(4, window_size=2)
        self.head = nn.Linear(4, 1)

    def forward(self, x, y, mode='tensor'):
        out = self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
        if mode == 'loss':
            return dict(loss=((out - y) ** 2).mean())
        if mode == 'predict':
            return [dict(pred=float(p), target=float(t)) for p, t in zip(out, y)]
        return out


@DATASETS.register_module()
class ExitToyData(Dataset):
    metainfo = dict(classes=('a',))

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(x=torch.randn(1, 6, 6, generator=g), y=torch.tensor([float(i % 3)]))


@METRICS.register_module()
class ExitToyMetric(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.extend(abs(s['pred'] - s['target']) for s in data_samples)

    def compute_metrics(self, results):
        return dict(mae=sum(results) / len(results))


@HOOKS.register_module()
class EndWithCollectivesHook(Hook):
    """The last thing the run does: collectives whose tensors Python drops at once."""
    priority = 'LOWEST'

    def after_run(self, runner):
        dist.all_reduce(torch.ones(1000))  # done; Python drops the tensor
        # Left in flight: rank 0 leaves this hook at once, rank 1 joins the
        # collectives one by one over a second, so they finish while rank 0 ends.
        for _ in range(20):
            if dist.get_rank() == 1:
                time.sleep(0.05)
            dist.all_reduce(torch.ones(1000), async_op=True)
'''

CONFIG = '''\
custom_imports = dict(imports=['cbn_plugin', 'exit_toy'], allow_failed_imports=False)
default_scope = 'mmengine'
model = dict(type='ExitToyNet')
train_dataloader = dict(batch_size=2, num_workers=0, dataset=dict(type='ExitToyData', n=8),
                        sampler=dict(type='DefaultSampler', shuffle=True),
                        collate_fn=dict(type='default_collate'))
val_dataloader = dict(batch_size=2, num_workers=0, dataset=dict(type='ExitToyData', n=4),
                      sampler=dict(type='DefaultSampler', shuffle=False),
                      collate_fn=dict(type='default_collate'))
val_evaluator = dict(type='ExitToyMetric')
val_cfg = dict()
train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=1)
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01))
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1),
                     logger=dict(type='LoggerHook', interval=1))
custom_hooks = [dict(type='CBNHook', burn_in_iters=0), dict(type='EndWithCollectivesHook')]
randomness = dict(seed=0)
'''


@pytest.fixture
def cpu_load():
    """A CPU-bound process beside the test, for its duration."""
    burner = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
    try:
        yield burner
    finally:
        burner.kill()
        burner.wait()


def start_launch(config, work_dir, tmp):
    """``bash tools/dist_train.sh config 2`` started in the background (as ``helpers.launch``)."""
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()),
               OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(tmp), os.environ.get('PYTHONPATH', '')]))
    env.pop('CUDA_VISIBLE_DEVICES', None)
    log = open(work_dir.with_suffix('.log'), 'w')
    proc = subprocess.Popen(['bash', str(REPO / 'tools' / 'dist_train.sh'), str(config), '2',
                             '--work-dir', str(work_dir)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    return proc, log


def test_finished_two_process_runs_exit_cleanly_under_cpu_load(tmp_path, cpu_load):
    """``RUNS`` launches at once (each is load for the others), beside a CPU-bound process."""
    (tmp_path / 'exit_toy.py').write_text(TOY_MODULE)
    config = tmp_path / 'exit_toy_config.py'
    config.write_text(CONFIG)
    work_dirs = [tmp_path / f'run{run}' for run in range(RUNS)]
    launches = [start_launch(config, work_dir, tmp_path) for work_dir in work_dirs]
    codes = []
    for proc, log in launches:
        try:
            codes.append(proc.wait(timeout=600))
        finally:
            log.close()
    assert cpu_load.poll() is None  # the load was there all along
    for run, (work_dir, code) in enumerate(zip(work_dirs, codes)):
        log = work_dir.with_suffix('.log').read_text()
        # Every rank exited with status 0, without an abort.
        assert code == 0 and 'terminate called' not in log, (run, code, log[-4000:])
        assert "dist_cfg=dict(backend='gloo')" in log
        assert (work_dir / 'epoch_1.pth').exists(), run
        assert 'Epoch(val) [1][1/1]' in log and 'mae: ' in log, (run, log[-3000:])
