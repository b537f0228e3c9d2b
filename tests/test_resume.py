"""Exact resume and damaged checkpoints, through the real tools.

``tools/train.py`` trains the real paper config
``configs/cbn/faster-rcnn_r50_fpn_4conv1fc-cbn_1x_coco.py`` shrunk through a
derived config (``_base_`` = the real file): the tiny COCO set of
``tiny_coco.py`` at 64 px, ResNet-18 at a quarter width, 32-channel FPN and
4conv1fc head, fewer proposals and RoIs, no pretrained weights, CBN burn-in
of 1 iteration (so the window is in use across the resume point),
validation after every epoch, ``randomness=dict(seed=0, deterministic=True)``
and ``num_workers=0``. Three runs:

- **whole**: 2 epochs (4 iterations) in one process;
- **crashed**: the same, but the process dies (``os._exit``) halfway through
  writing the epoch-2 checkpoint, a crash mid-write;
- **resumed**: ``tools/train.py --resume`` (auto) in the crashed run's work
  dir, in a fresh process.

Checked: the crash left no ``epoch_2.pth`` (checkpoints are written
atomically, the partial file keeps a ``.partial-<pid>`` name) and
``last_checkpoint`` still names the complete ``epoch_1.pth``; auto-resume
picks that one and restores the RNG states; the resumed losses equal the
whole run's exactly (``scalars.json``), and its ``epoch_2.pth`` equals the
whole run's bit for bit (every parameter, BN statistic, CBN window buffer
and step counter, the optimizer's momentum, the RNG states it ends with).

Then a truncated checkpoint and a garbage file given to ``tools/train.py
--resume PATH`` and ``tools/test.py CONFIG PATH``, and a ``last_checkpoint``
naming a truncated file, stop with a ``CheckpointFileError`` that names the
file, before anything is loaded.

The 8 tool processes (10 training iterations in all) run side by side, one
thread each: about 1.5 minutes on 2 busy CPU cores.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from helpers import EXACT_KEYS, FASTER, Tool, same_tree
from tiny_coco import narrow_config, train_records, write_tiny_coco

CRASH_EXIT = 17

# Imported by the crashing run's config: the write of a checkpoint whose file
# name contains $CRASH_ON stops halfway and the process dies on the spot.
CRASH_MODULE = f"""\
import os
from mmengine.fileio.backends.local_backend import LocalBackend

_put = LocalBackend.put


def put(self, obj, filepath):
    if os.environ['CRASH_ON'] in os.path.basename(str(filepath)):
        with open(filepath, 'wb') as f:
            f.write(obj[:len(obj) // 2])
        os._exit({CRASH_EXIT})
    return _put(self, obj, filepath)


LocalBackend.put = put
"""


def tiny_config(data: dict) -> str:
    # 64 px, validation on 2 images; the real layout, narrow.
    return narrow_config(FASTER, data, extra="""\
        custom_hooks = [dict(type='CBNHook', burn_in_iters=1)]
        train_cfg = dict(max_epochs=2, val_interval=1)
        default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
        randomness = dict(seed=0, deterministic=True)
    """)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Start every tool run of the module at once; the resumed run after the crash."""
    tmp = tmp_path_factory.mktemp('resume')
    data = write_tiny_coco(tmp / 'coco', num_images=4, seed=0)
    config = tmp / 'tiny_cbn.py'
    config.write_text(tiny_config(data))
    (tmp / 'crash_on_save.py').write_text(CRASH_MODULE)
    crash_config = tmp / 'tiny_cbn_crash.py'
    crash_config.write_text(f"_base_ = {str(config)!r}\ncustom_imports = dict(imports="
                            "['cbn_plugin', 'crash_on_save'], allow_failed_imports=False)\n")
    damaged = make_damaged(tmp / 'damaged')
    whole, crashed = tmp / 'whole', tmp / 'crashed'
    tools = {
        'whole': Tool(tmp / 'whole.log', 'tools/train.py', config, '--work-dir', whole),
        'crashed': Tool(tmp / 'crashed.log', 'tools/train.py', crash_config, '--work-dir',
                        crashed, env={'CRASH_ON': 'epoch_2.pth', 'PYTHONPATH': os.pathsep.join(
                            [str(tmp), os.environ.get('PYTHONPATH', '')])})}
    for damage, (path, _) in damaged.items():
        tools[f'train {damage}'] = Tool(tmp / f'train_{damage}.log', 'tools/train.py', config,
                                        '--work-dir', tmp / f'train_{damage}', '--resume', path)
        tools[f'test {damage}'] = Tool(tmp / f'test_{damage}.log', 'tools/test.py', config,
                                       path, '--work-dir', tmp / f'test_{damage}')
    # A newest checkpoint damaged after it was written, found by auto-resume.
    auto = tmp / 'auto_truncated'
    auto.mkdir()
    (auto / 'last_checkpoint').write_text(str(damaged['truncated'][0]))
    tools['auto truncated'] = Tool(tmp / 'auto.log', 'tools/train.py', config, '--work-dir',
                                   auto, '--resume')
    logs = {'crashed': tools['crashed'].result(expect=CRASH_EXIT)}
    # What the crash left, before the resumed run adds to the directory.
    left = dict(files=sorted(p.name for p in crashed.iterdir() if p.is_file()),
                last=(crashed / 'last_checkpoint').read_text())
    resumed = Tool(tmp / 'resumed.log', 'tools/train.py', config, '--work-dir', crashed,
                   '--resume')
    logs['whole'] = tools['whole'].result()
    logs['resumed'] = resumed.result()
    return dict(tmp=tmp, config=config, whole=whole, crashed=crashed, logs=logs, left=left,
                damaged=damaged, auto=auto, tools=tools)


def make_damaged(folder: Path) -> dict:
    """A truncated checkpoint and a garbage file, with the error each should get."""
    folder.mkdir()
    buffer = io.BytesIO()
    torch.save({'meta': {'epoch': 1}, 'state_dict': {'w': torch.randn(256, 256)}}, buffer)
    good = buffer.getvalue()
    truncated = folder / 'epoch_1.pth'
    truncated.write_bytes(good[:len(good) * 2 // 3])
    garbage = folder / 'garbage.pth'
    garbage.write_text('<html>502 Bad Gateway</html>\n')
    return {'truncated': (truncated, 'is truncated'),
            'garbage': (garbage, 'is not a PyTorch checkpoint')}


def test_crash_mid_write_leaves_previous_checkpoint_latest(runs):
    crashed, left = runs['crashed'], runs['left']
    assert 'Saving checkpoint at 2 epochs' in runs['logs']['crashed']
    # The half-written file never had the checkpoint's name.
    assert 'epoch_2.pth' not in left['files'], left['files']
    partial = [name for name in left['files'] if name.startswith('epoch_2.pth.partial-')]
    assert len(partial) == 1, left['files']
    assert 'epoch_1.pth' in left['files']
    assert left['last'] == str(crashed / 'epoch_1.pth')


def test_auto_resume_after_crash_is_bit_exact(runs):
    log = runs['logs']['resumed']
    assert f"Auto resumed from the latest checkpoint {runs['crashed'] / 'epoch_1.pth'}" in log
    assert 'resumed epoch: 1, iter: 2' in log
    assert 'restored the RNG states (torch, numpy, random' in log
    assert 'resumed at step 2' in log  # the CBN step counter

    (whole_log,) = runs['whole'].glob('*/vis_data/scalars.json')
    whole = train_records(whole_log)
    per_run = [train_records(p) for p in sorted(runs['crashed'].glob('*/vis_data/scalars.json'))]
    assert [[r['iter'] for r in rs] for rs in per_run] == [[1, 2, 3, 4], [3, 4]]
    crashed, resumed = per_run
    assert [r['iter'] for r in whole] == [1, 2, 3, 4]
    assert whole[1]['cbn_window'] > 1  # the window is in use before the checkpoint
    for got, want in [*zip(crashed, whole), *zip(resumed, whole[2:])]:
        assert got.keys() == want.keys(), (got['iter'], got.keys() ^ want.keys())
        for key in set(EXACT_KEYS) & want.keys():
            assert got[key] == want[key], (got['iter'], key, got[key], want[key])

    want = torch.load(runs['whole'] / 'epoch_2.pth')  # weights_only=True
    got = torch.load(runs['crashed'] / 'epoch_2.pth')
    assert got['meta']['epoch'] == 2 and got['meta']['iter'] == 4
    assert list(got['state_dict']) == list(want['state_dict'])
    differ = [k for k, v in want['state_dict'].items()
              if not torch.equal(got['state_dict'][k], v)]
    assert not differ, differ
    windows = [k for k in want['state_dict'] if k.endswith('.window_grad_var')]
    assert len(windows) == 12  # 4 lateral + 4 output FPN convs, 4 head convs
    assert int(want['state_dict']['neck.fpn_convs.0.bn.num_steps']) == 4
    assert int(want['state_dict']['roi_head.bbox_head.shared_convs.0.bn.window_filled'][0]) == 3
    assert len(want['optimizer']['state']) > 0  # SGD momentum buffers
    assert same_tree(got['optimizer'], want['optimizer'])
    assert same_tree(got['param_schedulers'], want['param_schedulers'])
    # Both runs end with the same generator states: they drew the same numbers.
    assert same_tree(got['rng_state'], want['rng_state'])
    # What a weights-only load would refuse: torch 2.5's question (the oldest lane's torch
    # 2.1 loads with full unpickling, tests/test_checkpoint.py says why that is tested there).
    if hasattr(torch.serialization, 'get_unsafe_globals_in_checkpoint'):
        for path in (runs['whole'] / 'epoch_2.pth', runs['crashed'] / 'epoch_1.pth'):
            assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []


@pytest.mark.parametrize('tool', ['train', 'test'])
@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_tools_refuse_damaged_checkpoint_naming_it(runs, tool, damage):
    """``tools/train.py --resume PATH`` and ``tools/test.py CONFIG PATH``."""
    path, message = runs['damaged'][damage]
    log = runs['tools'][f'{tool} {damage}'].result(expect=1)
    assert f'CheckpointFileError: checkpoint {path} {message}' in log, log[-3000:]
    assert 'Load checkpoint from' not in log and 'resumed epoch' not in log


def test_auto_resume_refuses_truncated_file_named_by_last_checkpoint(runs):
    """A newest checkpoint damaged after it was written: auto-resume stops and says so."""
    path, message = runs['damaged']['truncated']
    log = runs['tools']['auto truncated'].result(expect=1)
    record = runs['auto'] / 'last_checkpoint'
    assert (f'CheckpointFileError: checkpoint {path} (named by {record} for auto-resume) '
            f'{message}') in log, log[-3000:]
