"""End to end through the real tools, as a user runs them (CPU, a few iterations).

``tools/train.py`` trains the real paper config
``configs/cbn/faster-rcnn_r50_fpn_4conv1fc-cbn_1x_coco.py`` (R50-FPN, CBN in
the FPN and the 4conv1fc box head, ``CBNHook``) on a tiny synthetic COCO set
(``tiny_coco.py``). The config is only shrunk, through a derived config file
(``_base_`` = the real config: data, 128 px images, fewer proposals, no
pretrained weights) and ``--cfg-options`` (the burn-in, overridden inside the
``custom_hooks`` list, and the epoch count). Then:

- the CBN window switches on after the burn-in (``cbn_window`` in the run's
  ``vis_data/scalars.json``) and every logged loss is finite;
- the checkpoint loads with plain ``torch.load(path)`` (``weights_only=True``)
  in a fresh process that never imports the plugin;
- ``tools/test.py`` evaluates it and prints COCO bbox mAP: the numbers
  pycocotools gives for the predictions it dumps (``--out``) against the
  annotation file, and the same numbers as the validation at the end of
  training (the checkpoint round trip is exact);
- ``tools/train.py --resume CKPT`` continues at the saved epoch and iteration
  without re-running the burn-in;
- the Mask R-CNN CBN config trains (CBN in the mask head too) and evaluates
  bbox and segm mAP;
- ``tools/dist_*.sh`` build the documented ``torch.distributed.run`` command.

The model is barely trained: its mAP (about 0.01) is no target, so it is
checked against a recomputation, not a floor. The whole module takes about
1.5 minutes on 2 idle CPU cores (an R50-FPN step at 128 px is under a second
there; several times that when the cores are shared).
"""
from __future__ import annotations

import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import FASTER, MASK, REPO, run_tool
from tiny_coco import coco_map, derived_config, recomputed_map, scalars

BURN_IN = 2        # iterations of plain BN
ITERS_PER_EPOCH = 2  # 4 images, batch 2
HOOK_OVERRIDE = ['custom_hooks.0.burn_in_epochs=None', f'custom_hooks.0.burn_in_iters={BURN_IN}']
# Appear in every mmengine log line of a training iteration and in scalars.json.
LOSS_KEYS = ('loss', 'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox')


def tiny_config(base: Path, data: dict, mask: bool = False) -> str:
    """A derived config: the real ``base`` shrunk to the tiny dataset on CPU."""
    return derived_config(base, data, mask=mask, extra="""\
        train_cfg = dict(val_interval=100)  # validates once, after the last epoch
        default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
        randomness = dict(seed=0)
    """)


@pytest.fixture(scope='module')
def faster(tmp_path_factory, tiny_coco_set):
    """Train the Faster R-CNN CBN config for 2 epochs (4 iterations)."""
    assert FASTER.exists(), f'{FASTER} is missing'
    tmp = tmp_path_factory.mktemp('faster')
    config = tmp / 'tiny_faster-rcnn_cbn.py'
    data = tiny_coco_set(4)
    config.write_text(tiny_config(FASTER, data))
    work_dir = tmp / 'work'
    log = run_tool('tools/train.py', config, '--work-dir', work_dir, '--cfg-options',
                   *HOOK_OVERRIDE, 'train_cfg.max_epochs=2')
    return dict(config=config, work_dir=work_dir, log=log, tmp=tmp, data=data)


def test_train_activates_window_after_burn_in(faster):
    log, records = faster['log'], scalars(faster['work_dir'])
    assert f'CBNHook: burn-in {BURN_IN} of {2 * ITERS_PER_EPOCH} optimizer steps' in log
    assert 'bound 12 CBN layers' in log  # 4 lateral + 4 output FPN convs, 4 head convs
    assert [r['iter'] for r in records] == [1, 2, 3, 4]
    windows = [r['cbn_window'] for r in records]
    assert windows[:BURN_IN] == [1.0] * BURN_IN, windows
    assert all(w > 1 for w in windows[BURN_IN:]), windows
    assert windows == sorted(windows) and windows[-1] <= 4, windows  # window_size=4
    for r in records[BURN_IN:]:
        assert math.isfinite(r['cbn_mean_shift']) and 0 <= r['cbn_negative_fraction'] <= 1
    for r in records:
        for key in LOSS_KEYS:
            assert math.isfinite(r[key]), (key, r)
    assert f'cbn_window: {windows[-1]:.4f}' in log  # also in mmengine's log lines
    for hook in ('CheckpointFileCheckHook', 'AtomicCheckpointHook', 'RankStateHook',
                 'ResumeRNGHook', 'CheckpointCodecHook'):  # added by tools/train.py
        assert hook in log, hook
    assert 'WeightsOnlyCheckpointHook' not in log  # the hooks, not the bundle


def test_checkpoint_loads_with_plain_torch_load(faster):
    path = faster['work_dir'] / 'epoch_2.pth'
    script = textwrap.dedent(f"""
        import sys, torch
        ck = torch.load({str(path)!r})
        assert not any(m.split('.')[0] in ('cbn_plugin', 'mmengine', 'mmdet', 'mmcv')
                       for m in sys.modules)
        sd = ck['state_dict']
        assert int(sd['neck.fpn_convs.0.bn.num_steps']) == 4
        assert 1 <= int(sd['roi_head.bbox_head.shared_convs.3.bn.window_filled'][0]) <= 3
        print('OK', ck['meta']['epoch'], ck['meta']['iter'], len(sd))
    """)
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         cwd=faster['tmp'], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith('OK 2 4 ')


def test_test_tool_prints_bbox_map(faster):
    work_dir = faster['tmp'] / 'test'
    preds = work_dir / 'preds.pkl'
    log = run_tool('tools/test.py', faster['config'], faster['work_dir'] / 'epoch_2.pth',
                   '--work-dir', work_dir, '--out', preds)
    assert re.search(r'coco/bbox_mAP: -?\d+\.\d+', log), log[-3000:]
    numbers = coco_map(log)
    # The printed mAP is that of the predictions on this data: recomputed from the dumped
    # predictions (every image) with pycocotools against the annotation file. The tiny
    # run learns no stable mAP, so no floor is asserted on it; this equality fails when
    # the evaluation misreads the predictions, the images or the ground truth.
    with open(preds, 'rb') as f:
        predictions = pickle.load(f)
    assert sorted(p['img_id'] for p in predictions) == [1, 2, 3, 4]
    assert recomputed_map(predictions, faster['data']) == numbers
    # The same weights the final validation of training used: the same numbers.
    assert numbers == coco_map(faster['log'])


def test_resume_continues_training(faster):
    work_dir = faster['tmp'] / 'resumed'
    log = run_tool('tools/train.py', faster['config'], '--work-dir', work_dir,
                   '--resume', faster['work_dir'] / 'epoch_2.pth',
                   '--cfg-options', *HOOK_OVERRIDE, 'train_cfg.max_epochs=3')
    assert 'resumed epoch: 2, iter: 4' in log
    assert 'resumed at step 4' in log  # CBN's step counter came back with the weights
    assert 'is not HistoryBuffer' not in log and 'is not defined in message_hub' not in log
    records = scalars(work_dir)
    assert [r['iter'] for r in records] == [5, 6]
    assert all(r['cbn_window'] > 1 for r in records), records  # no second burn-in
    assert all(math.isfinite(r['loss']) for r in records)
    assert (work_dir / 'epoch_3.pth').exists()


def test_mask_rcnn_trains_and_evaluates_segm(tmp_path, tiny_coco_set):
    """One epoch (2 iterations, burn-in 1) then the validation: bbox and segm mAP."""
    assert MASK.exists(), f'{MASK} is missing'
    config = tmp_path / 'tiny_mask-rcnn_cbn.py'
    config.write_text(tiny_config(MASK, tiny_coco_set(4), mask=True))
    log = run_tool('tools/train.py', config, '--work-dir', tmp_path / 'work', '--cfg-options',
                   'custom_hooks.0.burn_in_epochs=None', 'custom_hooks.0.burn_in_iters=1',
                   'train_cfg.max_epochs=1', 'default_hooks.checkpoint.save_last=False')
    assert 'bound 16 CBN layers' in log  # + 4 mask-head convs
    records = scalars(tmp_path / 'work')
    windows = [r['cbn_window'] for r in records]
    assert len(windows) == 2 and windows[0] == 1.0 and windows[1] > 1, windows
    assert all(math.isfinite(r['loss_mask']) for r in records)
    for kind in ('bbox', 'segm'):
        assert re.search(rf'coco/{kind}_mAP: -?\d+\.\d+', log), log[-3000:]
        coco_map(log, kind)


@pytest.mark.parametrize('script', ['dist_train.sh', 'dist_test.sh'])
def test_dist_scripts_call_torchrun(tmp_path, script):
    """``dist_*.sh`` launch ``python -m torch.distributed.run`` with the env settings.

    This checks the command line they build (``PYTHON`` points at a recorder);
    real 2-process CPU launches are in ``tests/test_distributed.py``.
    """
    recorder = tmp_path / 'python'
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$PYTHONPATH" "$@" > "$0.args"\n')
    recorder.chmod(0o755)
    args = ['cfg with space.py', '4', '--cfg-options', 'a=1']
    if script == 'dist_test.sh':
        args.insert(1, 'ckpt.pth')
    env = dict(os.environ, PYTHON=str(recorder), NNODES='2', NODE_RANK='1',
               PORT='29555', MASTER_ADDR='10.0.0.1')
    subprocess.run(['bash', str(REPO / 'tools' / script), *args], env=env, check=True,
                   timeout=60)
    pythonpath, *argv = (tmp_path / 'python.args').read_text().splitlines()
    tool = 'train.py' if script == 'dist_train.sh' else 'test.py'
    positional = ['cfg with space.py'] + (['ckpt.pth'] if tool == 'test.py' else [])
    assert argv == ['-m', 'torch.distributed.run', '--nnodes=2', '--node_rank=1',
                    '--master_addr=10.0.0.1', '--nproc_per_node=4', '--master_port=29555',
                    f'{REPO}/tools/{tool}', *positional, '--launcher', 'pytorch',
                    '--cfg-options', 'a=1']
    assert Path(pythonpath.split(':')[0]).resolve() == REPO
