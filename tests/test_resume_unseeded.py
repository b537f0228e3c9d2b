"""Exact resume of the configs users write: no seed, and data-loading worker processes.

MMDetection's default runtime sets no ``randomness`` seed, so MMEngine draws
one in ``Runner.__init__`` and hands it, at build time, to the train
sampler (``DefaultSampler.seed``: the shuffle of every epoch) and to the
data-loading workers (``worker_init_fn``). A resumed process draws another
one and builds its dataloader before the checkpoint is read; restoring the
RNG states afterwards cannot repair that. ``tools/train.py`` now reads the
seed the checkpoint was written with before the Runner exists
(``cbn_plugin.engine.adopt_checkpoint_seed``).

Runs, all through ``tools/train.py`` on the real paper config
``faster-rcnn_r50_fpn_4conv1fc-cbn_1x_coco.py`` shrunk (``test_resume``'s
tiny model) to 6 images, 3 iterations per epoch, with no seed:

- **whole**: 2 epochs in one process, ``num_workers=0``;
- **resumed**: ``--resume whole/epoch_1.pth`` in a fresh process, in its own
  work dir: its ``epoch_2.pth`` equals the whole run's bit for bit (every
  parameter and buffer, CBN windows included, optimizer, schedulers, RNG
  states) and so do its losses. On the code before this change the two
  differed (the sampler shuffled epoch 2 with another seed);
- the same pair with ``num_workers=2, persistent_workers=False``: exact too
  (MMEngine restarts the workers every epoch from seeds that only depend on
  the run's seed, the rank and the worker index);
- with ``persistent_workers=True`` the workers of the uninterrupted run carry
  their generators from epoch 1 into epoch 2, the resumed run's start from
  the seed: the resume warns, naming the setting and what differs, and the
  result does differ (the control that shows the warning is needed).
"""
from __future__ import annotations

import re

import pytest
import torch

from helpers import EXACT_KEYS, Tool, differing, unseeded_config
from tiny_coco import train_records, write_tiny_coco

WORKER_WARNING = 'ResumeRNGHook: train_dataloader.persistent_workers=True'
NUM_IMAGES = 6  # 3 iterations of 2 images per epoch: 720 possible epoch orders


def epoch_2(work_dir) -> dict:
    return torch.load(work_dir / 'epoch_2.pth')  # weights_only=True


def seed_of(log: str) -> int:
    found = re.findall(r'\bseed: (\d+)', log)
    assert found, log[-3000:]
    return int(found[0])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('unseeded')
    data = write_tiny_coco(tmp / 'coco', num_images=NUM_IMAGES, seed=1)
    configs = {}
    for name, workers, persistent in (('main', 0, False), ('workers', 2, False),
                                      ('persistent', 2, True)):
        configs[name] = tmp / f'{name}.py'
        configs[name].write_text(unseeded_config(data, workers, persistent))
    out = {}
    # Two whole runs at a time: 2 busy cores.
    for names in (('main', 'workers'), ('persistent',)):
        whole = {n: Tool(tmp / f'{n}_whole.log', 'tools/train.py', configs[n], '--work-dir',
                         tmp / f'{n}_whole') for n in names}
        for n in names:
            out[n] = dict(whole_log=whole[n].result(), whole=tmp / f'{n}_whole')
        resumed = {n: Tool(tmp / f'{n}_resumed.log', 'tools/train.py', configs[n], '--work-dir',
                           tmp / f'{n}_resumed', '--resume', out[n]['whole'] / 'epoch_1.pth')
                   for n in names}
        for n in names:
            out[n].update(resumed_log=resumed[n].result(), resumed=tmp / f'{n}_resumed')
    return out


def check_exact(run: dict) -> None:
    want, got = epoch_2(run['whole']), epoch_2(run['resumed'])
    assert (got['meta']['epoch'], got['meta']['iter']) == (2, 2 * NUM_IMAGES // 2)
    assert differing(got, want) == []
    assert any(k.endswith('.window_grad_var') for k in want['state_dict'])
    (whole_log,) = run['whole'].glob('*/vis_data/scalars.json')
    (resumed_log,) = run['resumed'].glob('*/vis_data/scalars.json')
    whole, resumed = train_records(whole_log), train_records(resumed_log)
    assert [r['iter'] for r in resumed] == [4, 5, 6]
    for got_r, want_r in zip(resumed, whole[3:]):
        for key in set(EXACT_KEYS) & want_r.keys():
            assert got_r[key] == want_r[key], (got_r['iter'], key)


def test_unseeded_resume_is_bit_exact(runs):
    run = runs['main']
    seed = seed_of(run['whole_log'])
    assert epoch_2(run['whole'])['meta']['seed'] == seed
    log = run['resumed_log']
    assert (f'adopted seed {seed} from checkpoint {run["whole"] / "epoch_1.pth"}') in log, \
        log[-3000:]
    assert seed_of(log) == seed  # the resumed Runner seeded itself with the run's seed
    assert 'resumed epoch: 1, iter: 3' in log
    check_exact(run)


def test_unseeded_resume_with_workers_restarted_each_epoch_is_exact(runs):
    run = runs['workers']
    assert WORKER_WARNING not in run['resumed_log']
    check_exact(run)


def test_persistent_workers_resume_warns_and_differs(runs):
    run = runs['persistent']
    log = run['resumed_log']
    warning = re.search(r'train_dataloader\.persistent_workers=True with num_workers=2.*', log)
    assert warning, log[-4000:]
    assert 'persistent_workers=False' in warning.group(0)  # the exact setting, named
    assert WORKER_WARNING not in run['whole_log']  # only a resume warns
    # The control: the warning is true, the resumed run differs.
    assert differing(epoch_2(run['resumed']), epoch_2(run['whole'])) != []
