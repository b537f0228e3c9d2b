"""What several test files share: the toy CBN model and data, a tiny Runner, the tools
(one process and the distributed launchers), the unseeded resume config and the
checkpoint comparison.

The COCO-format data and the configs derived from the real ones are in
``tiny_coco.py``; the float64 brute force of the compensated backward in
``exact_oracle.py``; fixtures are in ``conftest.py``. Test files import from
these modules, never from each other.
"""
from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import cbn_plugin
import cbn_plugin.engine  # noqa: F401  (registers WeightsOnlyCheckpointHook)
from tiny_coco import narrow_config


def _gloo_rank(rank, store, results, collect):
    torch.distributed.init_process_group('gloo', init_method=f'file://{store}', rank=rank,
                                         world_size=2)
    try:
        torch.save(collect(rank), f'{results}.{rank}')
    finally:
        torch.distributed.destroy_process_group()


def on_two_ranks(tmp_path, collect) -> list:
    """What ``collect(rank)`` returns in each of 2 spawned processes joined by a gloo group
    (``collect``: a module-level function, so that the children can import it)."""
    torch.multiprocessing.start_processes(
        _gloo_rank, args=(str(tmp_path / 'store'), str(tmp_path / 'out'), collect), nprocs=2,
        start_method='spawn')
    return [torch.load(tmp_path / f'out.{rank}') for rank in range(2)]

REPO = Path(__file__).resolve().parents[1]
FASTER = REPO / 'configs' / 'cbn' / 'faster-rcnn_r50_fpn_4conv1fc-cbn_1x_coco.py'
FASTER_SYNC = REPO / 'configs' / 'cbn' / 'faster-rcnn_r50_fpn_4conv1fc-synccbn_1x_coco.py'
MASK = REPO / 'configs' / 'cbn' / 'mask-rcnn_r50_fpn_4conv1fc-cbn_1x_coco.py'
# Logged per iteration, and exactly reproducible (unlike time, data_time, eta).
EXACT_KEYS = ('loss', 'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'acc',
              'grad_norm', 'lr', 'cbn_window', 'cbn_mean_shift', 'cbn_negative_fraction')


# ---------------------------------------------------------------- the toy model and data
class ToyNet(BaseModel):
    """conv (1 -> 4) + CBN (or BN) + optional dropout + linear head, a regression loss.

    ``forwards`` counts the calls (the hook advances the window per optimizer
    step, not per forward).
    """

    def __init__(self, window_size: int = 2, norm: str = 'CBN', dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = cbn_plugin.CBN(4, window_size=window_size) if norm == 'CBN' \
            else nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()  # draws when > 0
        self.head = nn.Linear(4, 1)
        self.forwards = 0

    def forward(self, x, y, mode='tensor'):
        self.forwards += 1
        out = self.head(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))
        if mode == 'loss':
            return dict(loss=((out - y) ** 2).mean())
        return out


class ToyData(Dataset):
    """``n`` fixed 1x6x6 images (image ``i`` offset by ``shift * i``) and float targets."""

    # mmengine stores the train dataset's metainfo in meta and the message hub.
    metainfo = dict(classes=('a', 'b'), palette=[(1, 2, 3), (4, 5, 6)],
                    weights=np.array([0.25, 0.75], dtype=np.float32))

    def __init__(self, n: int = 8, shift: float = 0.0):
        self.n, self.shift = n, shift

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(x=torch.randn(1, 6, 6, generator=g) + self.shift * i,
                    y=torch.tensor([float(i % 3)]))


_RUNS = itertools.count()


def tiny_runner(work_dir, model=None, dataset=None, *, hooks=(), max_epochs: int = 2,
                max_iters: int | None = None, shuffle: bool = True, lr: float = 0.01,
                momentum: float = 0.0, accumulate: int = 1, metric=None, checkpoint=None,
                resume_from=None, batch_size: int = 2, loop: str | None = None,
                **runner_args) -> Runner:
    """An MMEngine Runner training ``model`` (a :class:`ToyNet`) on ``dataset`` at
    ``batch_size`` images per iteration.

    Epoch-based for ``max_epochs`` (iteration-based when ``max_iters``; ``loop`` names
    another train loop type),
    SGD, a checkpoint every epoch (``checkpoint``: more ``CheckpointHook``
    arguments), validation every epoch with ``metric`` when given, resumed
    from ``resume_from``; ``runner_args`` go to the Runner as they are.
    """
    loader = dict(dataset=dataset if dataset is not None else ToyData(), batch_size=batch_size,
                  num_workers=0, collate_fn=dict(type='default_collate'))
    train_cfg = (dict(by_epoch=False, max_iters=max_iters) if max_iters
                 else dict(by_epoch=True, max_epochs=max_epochs))
    if loop is not None:
        train_cfg = dict(type=loop, **{k: v for k, v in train_cfg.items() if k != 'by_epoch'})
    if metric is not None:
        train_cfg['val_interval'] = 1
        runner_args.update(val_dataloader=dict(loader, sampler=dict(type='DefaultSampler',
                                                                    shuffle=False)),
                           val_evaluator=dict(type=metric), val_cfg=dict())
    runner_args.setdefault('default_hooks', dict(
        checkpoint=dict(type='CheckpointHook', interval=1, **(checkpoint or {}))))
    runner_args.setdefault('experiment_name', f'{Path(work_dir).name}_{next(_RUNS)}_{os.getpid()}')
    return Runner(
        model=model if model is not None else ToyNet(), work_dir=str(work_dir),
        train_dataloader=dict(loader, sampler=dict(type='DefaultSampler', shuffle=shuffle)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=lr, momentum=momentum),
                           accumulative_counts=accumulate),
        train_cfg=train_cfg, custom_hooks=list(hooks) or None,
        resume=resume_from is not None, load_from=resume_from, **runner_args)


# ---------------------------------------------------------------- the tools
def run_tool(*args, timeout=300) -> str:
    """Run ``tools/<args>`` with this interpreter; return stdout+stderr, fail loudly."""
    out = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f'{args[0]} exited {out.returncode}:\n{log[-6000:]}'
    return log


class Tool:
    """``tools/<args>`` started in the background, on one thread.

    The runs are mostly independent, so they run side by side; one thread
    each keeps them from oversubscribing the cores (OpenMP threads that wait
    for each other spin), and all training runs use the same thread count,
    which keeps CPU results comparable bit for bit.
    """

    def __init__(self, log: Path, *args, env: dict | None = None) -> None:
        self.args, self.path = args, log
        with open(log, 'w') as out:
            self.proc = subprocess.Popen(
                [sys.executable, *map(str, args)], cwd=REPO, stdout=out,
                stderr=subprocess.STDOUT, text=True,
                env=dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', **(env or {})))

    def result(self, expect: int = 0, timeout: int = 400) -> str:
        """Wait; return the output; fail unless it exited with ``expect``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        log = self.path.read_text()
        assert code == expect, f'{self.args[0]} exited {code}, expected {expect}:\n{log[-6000:]}'
        return log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(script: str, *args, tmp: Path, timeout: int = 400) -> str:
    """``bash tools/<script> args`` with this interpreter on a free port; the log."""
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([str(tmp), os.environ.get('PYTHONPATH', '')]))
    env.pop('CUDA_VISIBLE_DEVICES', None)
    out = subprocess.run(['bash', str(REPO / 'tools' / script), *map(str, args)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f'{script} exited {out.returncode}:\n{log[-8000:]}'
    return log


# Source of ``cbn_rank_dump.py``, written next to the config of a ``launch``ed run and
# imported through ``custom_imports``: ``DumpCBNStateHook(out)`` saves each rank's
# CBN state to ``out/rank<r>.pth`` after training.
DUMP_HOOK = '''\
"""Save this rank's CBN layer state (and a parameter checksum) after training."""
import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from cbn_plugin import cbn_layers


@HOOKS.register_module()
class DumpCBNStateHook(Hook):
    def __init__(self, out):
        self.out = out

    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        layers = {}
        for name, layer in cbn_layers(model):
            state = {k: v.detach().clone() for k, v in layer.named_buffers()}
            state['burn_in_steps'] = layer.burn_in_steps
            layers[name] = state
        params = {name: p.detach().clone() for name, p in model.named_parameters()
                  if name.startswith(('neck.fpn_convs.0.', 'roi_head.bbox_head.shared_convs.3.'))}
        torch.save(dict(layers=layers, params=params, world_size=get_world_size(),
                        wrapper=type(runner.model).__name__,
                        loader_len=len(runner.train_dataloader)),
                   f'{self.out}/rank{get_rank()}.pth')
'''


# ---------------------------------------------------------------- resume runs, checkpoints
def unseeded_config(data: dict, workers: int = 0, persistent: bool = False, base=FASTER,
                    extra: str = '') -> str:
    """The real CBN config ``base``, tiny, no ``randomness`` at all (as MMDetection's default).

    ``extra``: config lines added at the end (hooks, imports).
    """
    text = narrow_config(base, data, extra=f"""\
        custom_hooks = [dict(type='CBNHook', burn_in_iters=1)]
        train_cfg = dict(max_epochs=2, val_interval=10)
        default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
    """) + extra
    loader = 'train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,'
    assert loader in text
    text = text.replace(loader, f'train_dataloader = dict(batch_size=2, num_workers={workers}, '
                                f'persistent_workers={persistent},')
    assert 'randomness' not in text and 'seed=' not in text
    return text


def same_tree(a, b) -> bool:
    """Bit-exact equality of nested tensors, dicts, lists and plain values (types too)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_tree, a, b))
    return type(a) is type(b) and a == b


def differing(got: dict, want: dict) -> list[str]:
    """Keys of the checkpoint (``state_dict`` entries one by one) that are not bit-identical."""
    bad = [k for k, v in want['state_dict'].items()
           if k not in got['state_dict'] or not torch.equal(got['state_dict'][k], v)]
    for key in ('optimizer', 'param_schedulers', 'rng_state'):
        if not same_tree(got[key], want[key]):
            bad.append(key)
    return bad
