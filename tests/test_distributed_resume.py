"""Multi-process resume is exact: every rank gets its own CBN windows and RNG states back.

``bash tools/dist_train.sh CONFIG 2`` (torchrun, 2 CPU processes, gloo) on the
real paper configs ``faster-rcnn_r50_fpn_4conv1fc-cbn_1x_coco.py`` and
``...-synccbn_1x_coco.py``, shrunk to ``test_resume``'s tiny model and 8
images at 64 px (2 iterations of 2 images per process and epoch), burn-in of
1 iteration (the windows are in use across the resume point), no seed in
the config (MMDetection's default). Runs:

- **whole**: 2 epochs;
- **resumed**: ``--resume whole/epoch_1.pth`` with 2 processes, in its own
  work dir.

Checked, for CBN: the resumed run's ``epoch_2.pth`` is the whole run's bit
for bit (parameters, rank 0's buffers, rank 1's buffers and RNG states in
``rank_states``, optimizer, schedulers); every rank's CBN state (windows,
running statistics, step counters) and parameters after training, dumped by
each rank (``DumpCBNStateHook``), are bit-identical to the whole run's
rank for rank; the two ranks' windows differ (so restoring rank 0's on
both would be caught); the losses rank 0 logs are equal. For SyncCBN: the
same, and both ranks' windows are identical. Then the 2-process CBN
checkpoint resumed by 1 process: the model is restored, the windows restart
empty (the dumped ``window_filled`` counts only the steps after the resume)
and the log says so.

About 1.5 minutes of wall time on 2 busy cores (5 launches, one at a time).
"""
from __future__ import annotations

import pytest
import torch

from helpers import DUMP_HOOK, EXACT_KEYS, Tool, launch, same_tree, unseeded_config
from tiny_coco import scalars

WORLD = 2
ITERS = 2  # per process and epoch: 8 images / (2 processes x 2 images)


def config_text(base, data, dump) -> str:
    return unseeded_config(data, base=base, extra=f"""
custom_imports = dict(imports=['cbn_plugin', 'cbn_rank_dump'], allow_failed_imports=False)
custom_hooks = [dict(type='CBNHook', burn_in_iters=1),
                dict(type='DumpCBNStateHook', out={str(dump)!r})]
""")


def build_run(tmp, data, base) -> dict:
    """The whole and the resumed 2-process run of ``base`` (the ``two_process_runs`` fixture's)."""
    (tmp / 'cbn_rank_dump.py').write_text(DUMP_HOOK)
    out = dict(tmp=tmp)
    for name, resume in (('whole', None), ('resumed', tmp / 'whole' / 'epoch_1.pth')):
        dump = tmp / f'dump_{name}'
        dump.mkdir()
        config = tmp / f'{name}.py'
        config.write_text(config_text(base, data, dump))
        args = ['--resume', resume] if resume else []
        out[name] = dict(log=launch('dist_train.sh', config, WORLD, '--work-dir', tmp / name,
                                    *args, tmp=tmp),
                         work_dir=tmp / name, config=config,
                         ranks=[torch.load(dump / f'rank{r}.pth') for r in range(WORLD)])
    return out


@pytest.fixture(scope='module')
def cbn(two_process_runs):
    return two_process_runs['CBN']


@pytest.fixture(scope='module')
def sync(two_process_runs):
    return two_process_runs['SyncCBN']


def check_exact(run: dict) -> None:
    whole, resumed = run['whole'], run['resumed']
    log = resumed['log']
    assert 'adopted seed' in log and f'resumed epoch: 1, iter: {ITERS}' in log
    # (MMEngine prints rank 0's log only; rank 1's restore shows in its state below.)
    assert f'saved at epoch 1, iter {ITERS} (rank 0 of {WORLD})' in log, log[-5000:]
    assert 'restart empty' not in log and 'not restored' not in log
    want = torch.load(whole['work_dir'] / 'epoch_2.pth')  # weights_only
    got = torch.load(resumed['work_dir'] / 'epoch_2.pth')
    assert want['rank_states']['world_size'] == WORLD
    differ = [k for k, v in want['state_dict'].items() if not torch.equal(got['state_dict'][k], v)]
    assert not differ, differ
    for key in ('optimizer', 'param_schedulers', 'rng_state', 'rank_states'):
        assert same_tree(got[key], want[key]), key
    # Every rank's own state after training, rank for rank, bit for bit.
    for rank, (a, b) in enumerate(zip(whole['ranks'], resumed['ranks'])):
        assert a['layers'].keys() == b['layers'].keys() and len(a['layers']) == 12
        for name, layer in a['layers'].items():
            assert int(layer['window_filled'][0]) == 3, (rank, name)  # k - 1: full
            for key, value in layer.items():
                assert same_tree(b['layers'][name][key], value), (rank, name, key)
        for name, value in a['params'].items():
            assert torch.equal(b['params'][name], value), (rank, name)
    records = {n: scalars(run[n]['work_dir']) for n in ('whole', 'resumed')}
    assert [r['iter'] for r in records['resumed']] == [3, 4]
    assert records['whole'][ITERS]['cbn_window'] > 1
    for got_r, want_r in zip(records['resumed'], records['whole'][ITERS:]):
        for key in set(EXACT_KEYS) & want_r.keys():
            assert got_r[key] == want_r[key], (got_r['iter'], key)


def test_cbn_two_process_resume_is_exact_per_rank(cbn):
    check_exact(cbn)
    rank0, rank1 = (s['layers'] for s in cbn['whole']['ranks'])
    # The ranks' windows differ: rank 0's on both ranks would not pass check_exact.
    for name in rank0:
        assert not torch.equal(rank0[name]['window_mean'], rank1[name]['window_mean']), name
    ck = torch.load(cbn['whole']['work_dir'] / 'epoch_1.pth')
    rank1_saved = ck['rank_states']['ranks'][1]['buffers']
    assert any(k.endswith('.window_grad_var') for k in rank1_saved)
    assert 'buffers' not in ck['rank_states']['ranks'][0]  # rank 0's are the state_dict


def test_sync_cbn_two_process_resume_is_exact_and_identical(sync):
    check_exact(sync)
    rank0, rank1 = (s['layers'] for s in sync['resumed']['ranks'])
    for name, layer in rank0.items():
        for key, value in layer.items():
            assert same_tree(rank1[name][key], value), (name, key)
    ck = torch.load(sync['whole']['work_dir'] / 'epoch_1.pth')
    # Stored once: no per-rank copy of a SyncCBN window, but its shift.
    assert not any('window' in k for k in ck['rank_states']['ranks'][1]['buffers'])
    assert len(ck['rank_states']['ranks'][0]['sync_shifts']) == 12


START_HOOK = """\
import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from cbn_plugin import cbn_layers


@HOOKS.register_module()
class DumpCBNAtStartHook(Hook):
    priority = 'HIGHEST'

    def __init__(self, out):
        self.out = out

    def before_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        torch.save({name: {k: v.clone() for k, v in layer.named_buffers()}
                    for name, layer in cbn_layers(model)}, self.out)
"""


def test_other_world_size_restores_model_and_empties_windows(cbn, tmp_path):
    """The 2-process checkpoint resumed by 1 process: windows restart empty, said so."""
    (tmp_path / 'cbn_start_dump.py').write_text(START_HOOK)
    start = tmp_path / 'start.pth'
    config = tmp_path / 'one.py'
    config.write_text(f"""_base_ = {str(cbn['whole']['config'])!r}
custom_imports = dict(imports=['cbn_plugin', 'cbn_rank_dump', 'cbn_start_dump'],
                      allow_failed_imports=False)
custom_hooks = [dict(type='CBNHook', burn_in_iters=1),
                dict(type='DumpCBNAtStartHook', out={str(start)!r})]
""")
    checkpoint = cbn['whole']['work_dir'] / 'epoch_1.pth'
    log = Tool(tmp_path / 'one.log', 'tools/train.py', config, '--work-dir', tmp_path / 'work',
               '--resume', checkpoint,
               env={'PYTHONPATH': f"{tmp_path}:{cbn['tmp']}"}).result()
    assert ('the checkpoint was written by 2 processes and this run has 1: the model '
            "(parameters, rank 0's running statistics) is restored, but the windows of 12 "
            'CBN layers restart empty') in log, log[-4000:]
    assert 'RNG states not restored: the checkpoint was written by 2 processes' in log
    saved = torch.load(checkpoint)['state_dict']
    at_start = torch.load(start)
    assert len(at_start) == 12
    for name, layer in at_start.items():
        assert int(saved[f'{name}.window_filled'][0]) > 0  # steps recorded before it
        assert int(layer['window_filled'][0]) == 0, name    # restarted empty
        assert int(layer['num_steps']) == ITERS, name       # the clock goes on
        assert torch.equal(layer['running_mean'], saved[f'{name}.running_mean']), name
    assert (tmp_path / 'work' / 'epoch_2.pth').exists()
