"""SIGKILL while a checkpoint is being written: nothing is lost, ``--resume`` goes on.

A real ``tools/train.py`` process (the real CBN paper config, shrunk as in
``test_resume_unseeded``) writes its epoch-2 checkpoint slowly: a test-only
module, imported through ``custom_imports``, makes MMEngine's local backend
write that file in 20 chunks, 0.3 s apart, and drops a marker file when it
starts. The test waits for the marker, lets a few chunks land and sends
SIGKILL from outside (no Python cleanup runs in the killed process). Then:

- the half-written bytes exist (the kill hit mid-write), but only under the
  ``.partial-<pid>`` name; there is no ``epoch_2.pth``;
- ``epoch_1.pth`` passes the full check (zip directory and every member's
  CRC-32) and loads with plain ``torch.load``; ``last_checkpoint`` names it;
- ``tools/train.py --resume`` (auto) in the same work dir continues from it,
  and its ``epoch_2.pth`` equals an uninterrupted run's bit for bit.

Also: ``max_keep_ckpts=1`` (MMEngine deletes the only checkpoint before
writing the next one, so a crash in between leaves none) is warned about
when training starts.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from cbn_plugin.engine import check_checkpoint_file
from helpers import Tool, differing, unseeded_config
from tiny_coco import write_tiny_coco

SLOW_SAVE = """\
import os
import time
from mmengine.fileio.backends.local_backend import LocalBackend

_put = LocalBackend.put


def put(self, obj, filepath):
    if os.environ.get('SLOW_SAVE_ON', '//') not in os.path.basename(str(filepath)):
        return _put(self, obj, filepath)
    with open(os.environ['SLOW_SAVE_MARKER'], 'w') as marker:
        marker.write(str(filepath))
    chunk = len(obj) // 20 + 1
    with open(filepath, 'wb') as f:
        for start in range(0, len(obj), chunk):
            f.write(obj[start:start + chunk])
            f.flush()
            time.sleep(0.3)


LocalBackend.put = put
"""


@pytest.fixture(scope='module')
def crash(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('crash')
    data = write_tiny_coco(tmp / 'coco', num_images=6, seed=1)
    (tmp / 'slow_save.py').write_text(SLOW_SAVE)
    seeded = "randomness = dict(seed=7)\n"
    config = tmp / 'cbn.py'
    config.write_text(unseeded_config(data) + seeded)
    slow = tmp / 'cbn_slow.py'
    slow.write_text(f"_base_ = {str(config)!r}\ncustom_imports = dict(imports=['cbn_plugin', "
                    "'slow_save'], allow_failed_imports=False)\n")
    marker = tmp / 'saving'
    env = {'PYTHONPATH': os.pathsep.join([str(tmp), os.environ.get('PYTHONPATH', '')]),
           'SLOW_SAVE_ON': 'epoch_2.pth', 'SLOW_SAVE_MARKER': str(marker)}
    killed = Tool(tmp / 'killed.log', 'tools/train.py', slow, '--work-dir', tmp / 'work', env=env)
    deadline = time.time() + 300
    while not marker.exists():
        assert killed.proc.poll() is None, killed.path.read_text()[-3000:]
        assert time.time() < deadline, 'the epoch-2 checkpoint was never written'
        time.sleep(0.1)
    time.sleep(1.0)  # a few chunks are on disk
    os.kill(killed.proc.pid, signal.SIGKILL)
    killed.result(expect=-signal.SIGKILL)
    work = tmp / 'work'
    left = {p.name: p.stat().st_size for p in work.iterdir() if p.is_file()}
    last = (work / 'last_checkpoint').read_text()
    whole = Tool(tmp / 'whole.log', 'tools/train.py', config, '--work-dir', tmp / 'whole')
    whole_log = whole.result()
    resumed = Tool(tmp / 'resumed.log', 'tools/train.py', config, '--work-dir', work, '--resume')
    return dict(work=work, left=left, last=last, marker=marker.read_text(),
                whole=tmp / 'whole', whole_log=whole_log, resumed_log=resumed.result(),
                pid=killed.proc.pid, tmp=tmp, config=config)


def test_kill_mid_save_leaves_previous_checkpoint_valid(crash):
    work, left = crash['work'], crash['left']
    partial = f'epoch_2.pth.partial-{crash["pid"]}'
    assert crash['marker'] == str(work / partial)  # MMEngine was writing the partial name
    assert 'epoch_2.pth' not in left, left
    assert 0 < left[partial], left  # the kill hit mid-write ...
    assert left[partial] < left['epoch_1.pth'], left  # ... with part of the file on disk
    assert crash['last'] == str(work / 'epoch_1.pth')
    check_checkpoint_file(work / 'epoch_1.pth', crc=True)
    assert torch.load(work / 'epoch_1.pth')['meta']['epoch'] == 1  # weights_only


def test_auto_resume_after_kill_continues_exactly(crash):
    log = crash['resumed_log']
    assert f"Auto resumed from the latest checkpoint {crash['work'] / 'epoch_1.pth'}" in log
    assert 'resumed epoch: 1, iter: 3' in log
    want = torch.load(crash['whole'] / 'epoch_2.pth')
    got = torch.load(crash['work'] / 'epoch_2.pth')
    assert differing(got, want) == []
    assert (crash['work'] / 'last_checkpoint').read_text() == str(crash['work'] / 'epoch_2.pth')


def test_single_kept_checkpoint_is_warned_about(crash, tmp_path):
    config = tmp_path / 'keep1.py'
    config.write_text(f"_base_ = {str(crash['config'])!r}\n"
                      "default_hooks = dict(checkpoint=dict(max_keep_ckpts=1))\n"
                      "train_cfg = dict(max_epochs=1)\n")
    log = Tool(tmp_path / 'keep1.log', 'tools/train.py', config, '--work-dir',
               tmp_path / 'work').result()
    assert ('AtomicCheckpointHook: CheckpointHook max_keep_ckpts=1: MMEngine deletes the '
            'only kept checkpoint before it writes the next one') in log, log[-3000:]
    assert 'max_keep_ckpts=1' not in crash['whole_log'].split('Checkpoints will be saved')[-1]
