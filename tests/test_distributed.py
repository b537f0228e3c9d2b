"""Distributed training through the real launcher: 2 CPU processes, gloo, torchrun.

``bash tools/dist_train.sh CONFIG 2`` runs the real paper configs
``faster-rcnn_r50_fpn_4conv1fc-cbn_1x_coco.py`` and ``...-synccbn_1x_coco.py``,
shrunk through a derived config (``_base_`` = the real config: the tiny COCO
set of ``tiny_coco.py``, 128 px images, fewer proposals, no pretrained
weights, and a ResNet-18 backbone instead of ResNet-50: the CBN layers, FPN
and 4conv1fc head are the config's, the launcher path is what is tested) and
``--cfg-options`` (the burn-in and epoch count). 8 images, 2 per process and
iteration, 2 processes: 2 iterations per epoch and process. Checked:

- ``tools/train.py`` initialises gloo itself and wraps the model in DDP
  without ``device_ids`` (MMEngine 0.10.7 alone needs a GPU for both);
- CBN: burn-in ``burn_in_epochs=1`` is 2 optimizer steps, from the
  per-process dataloader length; the window switches on (``cbn_window`` in
  ``scalars.json``); losses finite; the COCO mAP the validation prints equals
  the one recomputed (pycocotools) from its dumped predictions; the
  checkpoint loads with plain ``torch.load``; each process advanced its
  layers once per step; the per-process windows and running statistics
  *differ* between the ranks (DDP's ``broadcast_buffers=False``), the
  parameters do not; ``--resume`` continues for 2 more iterations;
- SyncCBN: the windows and running statistics are *identical* on both
  ranks; ``tools/dist_test.sh`` with 2 processes evaluates the checkpoint to
  the same mAP as the validation at the end of training;
- the CPU setup helper and the Slurm/MPI environment translation
  (``tools/launch_support.py``, unit level), and ``tools/slurm_*.sh`` build the documented
  ``srun`` command;
- ``tools/analysis_tools/measure_comm.py`` runs (2 gloo processes, tiny maps) and counts
  the all-reduce payloads ``docs/scaling.md`` documents.

Each rank's CBN state is dumped after training by a tiny hook
(``DumpCBNStateHook``, written next to the config and imported through
``custom_imports``). About 100 s of CPU time; 3 minutes of wall time on 2
CPU cores shared with other jobs (load average 6), less on idle ones (an
R18-FPN step at 128 px takes about 2 s with the 2 processes sharing them).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from helpers import DUMP_HOOK, REPO, free_port, launch
from tiny_coco import coco_map, derived_config, recomputed_map, scalars

sys.path.insert(0, str(REPO / 'tools'))
import launch_support as launch_kit  # noqa: E402  (beside the tools it serves)

WORLD = 2
ITERS_PER_EPOCH = 2  # 8 images / (2 processes x 2 images)
LOSS_KEYS = ('loss', 'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox')
# 1 epoch of burn-in (2 steps per process), 2 epochs of training.
OPTIONS = ['custom_hooks.0.burn_in_epochs=1', 'model.backbone.depth=18',
           'model.neck.in_channels=[64,128,256,512]']
VAL_PREDS = 'val_preds.pkl'


def tiny_config(base: Path, data: dict, dump_dir: Path) -> str:
    """The real ``base`` config shrunk to the tiny dataset, plus the dump hook.

    The hook list is the real config's (``CBNHook``, shortened by ``OPTIONS``)
    with the dump hook appended; the validation dumps its predictions to
    ``dump_dir / VAL_PREDS``.
    """
    hooks = [dict(h) for h in Config.fromfile(str(base)).custom_hooks]
    hooks.append(dict(type='DumpCBNStateHook', out=str(dump_dir)))
    return derived_config(base, data, extra=f"""\
        train_cfg = dict(max_epochs=2, val_interval=100)  # validates after the last epoch
        default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
        randomness = dict(seed=0)
        custom_imports = dict(imports=['cbn_plugin', 'cbn_rank_dump'],
                              allow_failed_imports=False)
        custom_hooks = {hooks!r}
        # The validation also dumps its predictions (rank 0, all images), for recomputed_map;
        # test_evaluator keeps the plain CocoMetric.
        val_evaluator = [dict(val_evaluator, type='CocoMetric'),
                         dict(type='DumpDetResults', out_file_path={str(dump_dir / VAL_PREDS)!r})]
    """)


def rank_states(dump_dir: Path) -> list[dict]:
    return [torch.load(dump_dir / f'rank{r}.pth') for r in range(WORLD)]


def build_run(tmp: Path, data: dict, base: Path) -> dict:
    """Train ``base`` shrunk with 2 processes (the ``two_process_runs`` fixture's run)."""
    (tmp / 'cbn_rank_dump.py').write_text(DUMP_HOOK)
    dump = tmp / 'dump'
    dump.mkdir()
    config = tmp / f'tiny_{base.stem}.py'
    config.write_text(tiny_config(base, data, dump))
    work_dir = tmp / 'work'
    log = launch('dist_train.sh', config, WORLD, '--work-dir', work_dir,
                 '--cfg-options', *OPTIONS, tmp=tmp)
    with open(dump / VAL_PREDS, 'rb') as f:  # before a resumed run overwrites it
        val_preds = pickle.load(f)
    return dict(tmp=tmp, config=config, work_dir=work_dir, log=log, dump=dump, data=data,
                states=rank_states(dump), val_preds=val_preds)


@pytest.fixture(scope='module')
def cbn(two_process_runs):
    return two_process_runs['CBN']


@pytest.fixture(scope='module')
def sync(two_process_runs):
    return two_process_runs['SyncCBN']


def check_training(run: dict) -> list[dict]:
    """What both variants must show: gloo, DDP, burn-in per process, window on, mAP."""
    log = run['log']
    assert "dist_cfg=dict(backend='gloo')" in log
    # burn_in_epochs=1 is the per-process dataloader length (2), not the global 4.
    assert (f'CBNHook: burn-in {ITERS_PER_EPOCH} of {2 * ITERS_PER_EPOCH} optimizer steps '
            f'(per process, world size {WORLD})') in log
    assert 'bound 12 CBN layers' in log
    records = scalars(run['work_dir'])
    assert [r['iter'] for r in records] == [1, 2, 3, 4]
    windows = [r['cbn_window'] for r in records]
    assert windows[:ITERS_PER_EPOCH] == [1.0] * ITERS_PER_EPOCH, windows
    assert all(1 < w <= 4 for w in windows[ITERS_PER_EPOCH:]), windows
    for r in records:
        for key in LOSS_KEYS:
            assert math.isfinite(r[key]), (key, r)
    # The printed mAP is that of the validation's predictions (both ranks' halves, every
    # image once), recomputed with pycocotools against the annotation file. The 4 tiny
    # steps learn no stable mAP, so no floor; this fails when the gathering of the
    # ranks' results or the evaluation goes wrong.
    assert sorted(p['img_id'] for p in run['val_preds']) == list(range(1, 9))
    assert recomputed_map(run['val_preds'], run['data']) == coco_map(log)
    states = run['states']
    for rank, state in enumerate(states):
        assert state['world_size'] == WORLD and state['wrapper'] == 'MMDistributedDataParallel'
        assert state['loader_len'] == ITERS_PER_EPOCH
        assert len(state['layers']) == 12
        for name, layer in state['layers'].items():
            # Once per optimizer step, on every process.
            assert int(layer['num_steps']) == 2 * ITERS_PER_EPOCH, (rank, name)
            assert layer['burn_in_steps'] == ITERS_PER_EPOCH, (rank, name)
            assert 'window_grad_var' in layer, (rank, name)
    # DDP keeps the parameters identical.
    assert states[0]['params'].keys() == states[1]['params'].keys() != set()
    for name, value in states[0]['params'].items():
        torch.testing.assert_close(states[1]['params'][name], value, rtol=1e-6, atol=1e-7,
                                   msg=name)
    return records


STATISTICS = ('window_mean', 'window_var', 'window_grad_mean', 'window_grad_var',
              'running_mean', 'running_var')


def window_tensors(layer: dict) -> dict:
    """The statistics a layer holds (window entries, running averages)."""
    assert set(STATISTICS) <= layer.keys()
    return {k: layer[k] for k in STATISTICS}


# ------------------------------------------------------------------------ CBN


def test_cbn_trains_on_two_cpu_processes(cbn):
    check_training(cbn)


def test_cbn_windows_are_per_process(cbn):
    """broadcast_buffers=False: no rank's window overwrites the other's."""
    a, b = (s['layers'] for s in cbn['states'])
    for name in a:
        for key in ('num_steps', 'window_next', 'window_filled'):  # the same clock
            assert torch.equal(a[name][key], b[name][key]), (name, key)
        for key, value in window_tensors(a[name]).items():
            assert value.shape == b[name][key].shape, (name, key)
            assert not torch.allclose(value, b[name][key]), (name, key)


def test_cbn_checkpoint_loads_with_plain_torch_load(cbn):
    ck = torch.load(cbn['work_dir'] / 'epoch_2.pth')  # weights_only=True
    assert (ck['meta']['epoch'], ck['meta']['iter']) == (2, 2 * ITERS_PER_EPOCH)
    sd = ck['state_dict']
    assert int(sd['neck.fpn_convs.0.bn.num_steps']) == 2 * ITERS_PER_EPOCH
    # The checkpoint is rank 0's (MMEngine saves on rank 0 only).
    rank0 = cbn['states'][0]['layers']['neck.fpn_convs.0.bn']
    torch.testing.assert_close(sd['neck.fpn_convs.0.bn.window_mean'], rank0['window_mean'])


def test_cbn_resume_two_processes(cbn):
    work_dir = cbn['tmp'] / 'resumed'
    log = launch('dist_train.sh', cbn['config'], WORLD, '--work-dir', work_dir,
                 '--resume', cbn['work_dir'] / 'epoch_2.pth',
                 '--cfg-options', *OPTIONS, 'train_cfg.max_epochs=3', tmp=cbn['tmp'])
    assert f'resumed epoch: 2, iter: {2 * ITERS_PER_EPOCH}' in log
    assert f'resumed at step {2 * ITERS_PER_EPOCH}' in log
    records = scalars(work_dir)
    assert [r['iter'] for r in records] == [5, 6]
    assert all(r['cbn_window'] == 4.0 for r in records), records
    assert all(math.isfinite(r[k]) for r in records for k in LOSS_KEYS)
    coco_map(log)
    for state in rank_states(cbn['dump']):
        for layer in state['layers'].values():
            assert int(layer['num_steps']) == 3 * ITERS_PER_EPOCH


# -------------------------------------------------------------------- SyncCBN


def test_sync_cbn_trains_on_two_cpu_processes(sync):
    check_training(sync)
    assert 'no initialised process group' not in sync['log']


def test_sync_cbn_windows_are_identical(sync):
    a, b = (s['layers'] for s in sync['states'])
    for name in a:
        for key in ('num_steps', 'window_next', 'window_filled'):
            assert torch.equal(a[name][key], b[name][key]), (name, key)
        # Bit for bit: every rank computes from the same all-reduced sums.
        for key, value in window_tensors(a[name]).items():
            assert torch.equal(b[name][key], value), (name, key)


def test_sync_cbn_dist_test_matches_training_validation(sync):
    """Identical model on both ranks: the 2-process test gives the validation's mAP."""
    work_dir = sync['tmp'] / 'test'
    log = launch('dist_test.sh', sync['config'], sync['work_dir'] / 'epoch_2.pth', WORLD,
                 '--work-dir', work_dir, '--cfg-options', *OPTIONS, tmp=sync['tmp'])
    assert "dist_cfg=dict(backend='gloo')" in log
    assert coco_map(log) == coco_map(sync['log'])


# ------------------------------------------------------------- unit level


def test_launcher_env_slurm(monkeypatch, tmp_path):
    scontrol = tmp_path / 'scontrol'
    scontrol.write_text('#!/bin/sh\nprintf "node-a\\nnode-b\\n"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv('PATH', f'{tmp_path}{os.pathsep}{os.environ["PATH"]}')
    for key in ('MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv('SLURM_PROCID', '5')
    monkeypatch.setenv('SLURM_NTASKS', '8')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    monkeypatch.setenv('SLURM_NODELIST', 'node-[a-b]')
    assert launch_kit.launcher_env('slurm') == dict(
        RANK='5', WORLD_SIZE='8', LOCAL_RANK='1', MASTER_ADDR='node-a', MASTER_PORT='29500')
    assert launch_kit.launcher_env('slurm', port=1234)['MASTER_PORT'] == '1234'
    monkeypatch.setenv('MASTER_ADDR', 'head')
    monkeypatch.setenv('MASTER_PORT', '4321')
    env = launch_kit.launcher_env('slurm')
    assert (env['MASTER_ADDR'], env['MASTER_PORT']) == ('head', '4321')


def test_launcher_env_pytorch_and_mpi(monkeypatch):
    for key, value in dict(RANK='1', WORLD_SIZE='2', LOCAL_RANK='1', MASTER_ADDR='h',
                           MASTER_PORT='7').items():
        monkeypatch.setenv(key, value)
    assert launch_kit.launcher_env('pytorch') == dict(
        RANK='1', WORLD_SIZE='2', LOCAL_RANK='1', MASTER_ADDR='h', MASTER_PORT='7')
    monkeypatch.delenv('RANK')
    with pytest.raises(RuntimeError, match=r"needs \['RANK'\].*torchrun"):
        launch_kit.launcher_env('pytorch')
    for key, value in dict(OMPI_COMM_WORLD_RANK='3', OMPI_COMM_WORLD_SIZE='4',
                           OMPI_COMM_WORLD_LOCAL_RANK='0').items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv('MASTER_PORT')
    assert launch_kit.launcher_env('mpi') == dict(
        RANK='3', WORLD_SIZE='4', LOCAL_RANK='0', MASTER_ADDR='h', MASTER_PORT='29500')


def test_setup_cpu_distributed(monkeypatch):
    """One-process gloo group from torchrun-style variables; the DDP wrapper config."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    none = Config(dict(launcher='none', env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    assert launch_kit.setup_cpu_distributed(none) is False
    assert 'model_wrapper_cfg' not in none
    for key, value in dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    start_method = mp.get_start_method(allow_none=True)
    cfg = Config(dict(launcher='pytorch', find_unused_parameters=True,
                      env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=60))))
    try:
        assert launch_kit.setup_cpu_distributed(cfg) is True
        assert dist.is_initialized() and dist.get_backend() == 'gloo'
        assert dist.get_world_size() == 1
        assert cfg.env_cfg.dist_cfg.backend == 'gloo'
        assert cfg.model_wrapper_cfg == dict(type='MMDistributedDataParallel', device_ids=None,
                                             broadcast_buffers=False,
                                             find_unused_parameters=True)
        # Already initialised: nothing more to do.
        again = Config(dict(launcher='pytorch'))
        assert launch_kit.setup_cpu_distributed(again) is False
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if start_method is None:
            mp.set_start_method(None, force=True)
    # A wrapper config of the user's keeps its settings and loses only the GPU index.
    for key, value in dict(MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    cfg = Config(dict(launcher='pytorch',
                      model_wrapper_cfg=dict(type='MMDistributedDataParallel',
                                             find_unused_parameters=True)))
    try:
        assert launch_kit.setup_cpu_distributed(cfg) is True
        assert cfg.model_wrapper_cfg == dict(type='MMDistributedDataParallel',
                                             find_unused_parameters=True, device_ids=None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if start_method is None:
            mp.set_start_method(None, force=True)


@pytest.mark.parametrize('script', ['slurm_train.sh', 'slurm_test.sh'])
def test_slurm_scripts_call_srun(tmp_path, script):
    """``slurm_*.sh`` run the tool under ``srun`` with ``--launcher=slurm`` (mmdet's scripts)."""
    recorder = tmp_path / 'srun'
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$PYTHONPATH" "$@" > "$0.args"\n')
    recorder.chmod(0o755)
    args = ['part', 'job', 'cfg.py', 'work' if script == 'slurm_train.sh' else 'ckpt.pth',
            '--cfg-options', 'a=1']
    env = dict(os.environ, PATH=f'{tmp_path}{os.pathsep}{os.environ["PATH"]}', GPUS='16',
               GPUS_PER_NODE='8', CPUS_PER_TASK='4', SRUN_ARGS='--qos=low', PYTHON='py')
    subprocess.run(['bash', str(REPO / 'tools' / script), *args], env=env, check=True,
                   timeout=60, capture_output=True)
    pythonpath, *argv = (tmp_path / 'srun.args').read_text().splitlines()
    assert Path(pythonpath.split(':')[0]).resolve() == REPO
    common = ['-p', 'part', '--job-name=job', '--gres=gpu:8', '--ntasks=16',
              '--ntasks-per-node=8', '--cpus-per-task=4', '--kill-on-bad-exit=1', '--qos=low',
              'py', '-u']
    if script == 'slurm_train.sh':
        tail = [f'{REPO}/tools/train.py', 'cfg.py', '--work-dir=work', '--launcher=slurm']
    else:
        tail = [f'{REPO}/tools/test.py', 'cfg.py', 'ckpt.pth', '--launcher=slurm']
    assert argv == common + tail + ['--cfg-options', 'a=1']


def test_measure_comm_counts_the_documented_payloads(tmp_path):
    """``tools/analysis_tools/measure_comm.py`` (2 gloo processes, tiny maps): the all-reduce
    sizes it counts are ``1 + 2C`` (+ ``P + |W|`` when compensating) forward and ``2C``
    backward, and its per-step total is their sum over the 12 layers."""
    out = tmp_path / 'comm.json'
    tool = REPO / 'tools' / 'analysis_tools' / 'measure_comm.py'
    run = subprocess.run([sys.executable, str(tool),
                          '--image', '32', '32', '--rois', '1', '--warmup', '2', '--repeats', '1',
                          '--no-ddp-reference', '--out', str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    result = json.loads(out.read_text())
    assert result['world_size'] == 2 and result['backend'] == 'gloo'
    c = 256
    calls = numbers = 0
    for layer in result['layers']:
        p = layer['cin'] * layer['kernel'] ** 2
        assert layer['calls']['BN'] == layer['calls']['CBN'] == []
        assert layer['calls']['SyncBN'] == [1 + 2 * c, 2 * c]
        assert layer['calls']['SyncCBN'] == [1 + 2 * c + p + c * p, 2 * c]
        calls += 2 * layer['count']
        numbers += (1 + 4 * c + p + c * p) * layer['count']
    assert sum(layer['count'] for layer in result['layers']) == 12
    # The per-step total it prints is the sum of the payloads above over the 12 layers.
    assert f'| SyncCBN | {calls} | {numbers:,} | {4 * numbers / 1e6:.2f} |' in run.stdout
