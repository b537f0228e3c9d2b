"""No host synchronisation in a steady-state training step.

On a GPU every ``.item()``, ``int(t)``, ``float(t)``, ``if t:``, ``t.tolist()``
or a tensor used as a Python index waits for the device's queue to drain. A
steady-state step (forward, backward, optimizer step, ``cbn_plugin.step``) of
CBN and SyncCBN must make none, in every mode, and ``CBNHook`` reads its
diagnostics only on the iterations the logger writes. The trap counts every
call of those ``Tensor`` methods while it is set.
"""
import contextlib
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import cbn_plugin
from cbn_plugin import CBN, SyncCBN

HOST_READS = ('item', '__int__', '__float__', '__bool__', '__index__', 'tolist')


@contextlib.contextmanager
def trapped_host_reads():
    """Record (method, where) for every host read of a tensor while in the block."""
    calls, originals = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append((name, ''.join(traceback.format_stack(limit=8)[:-1])))
            return original(self, *args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, spy(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class Net(nn.Module):
    def __init__(self, norm, **cbn):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = norm(8, **cbn)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = norm(8, **cbn)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def train_steps(model, opt, steps, calls=1, gen=None, size=6):
    for _ in range(steps):
        for _ in range(calls):
            x = torch.randn(2, 3, size, size, generator=gen)
            model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        cbn_plugin.step(model)


MODES = {
    'default': dict(window_size=4),
    'paper': dict(window_size=4, mode='paper'),
    'pooled-exclude': dict(window_size=3, stats_backward='pooled', variance_rule='exclude'),
    'mu_nu': dict(window_size=4, compensation='mu_nu'),
    'naive': dict(window_size=4, rho=0.0),
    'sampled': dict(window_size=4, dvar_stride=2),
    'per-call': dict(window_size=3, per_call_windows=True),
    'cumulative-momentum': dict(window_size=3, momentum=None),
}


def host_reads_in_steady_state(norm=CBN, calls=1, gen=None, **cbn):
    torch.manual_seed(0)
    model = Net(norm, **cbn)
    cbn_plugin.bind(model, logger=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    window = cbn.get('window_size', 4)
    train_steps(model, opt, window + 1, calls, gen)  # the windows are full
    with trapped_host_reads() as calls_seen:
        train_steps(model, opt, 3, calls, gen)
    # The trapped steps pooled the full window (per_call_windows: at every position).
    assert model.bn1.diagnostics['window'] == window and model.bn1.steps_done == window + 4
    return calls_seen


@pytest.mark.parametrize('mode', sorted(MODES))
def test_cbn_step_reads_nothing_back(mode):
    calls = host_reads_in_steady_state(**MODES[mode])
    assert calls == [], calls[0][1] if calls else ''


def test_gradient_accumulation_reads_nothing_back():
    calls = host_reads_in_steady_state(calls=3, window_size=3)
    assert calls == [], calls[0][1] if calls else ''


def test_the_trap_catches_host_reads():
    """The oracle fails on what it is there to catch (a read of a step counter)."""
    with trapped_host_reads() as calls:
        counter = torch.zeros((), dtype=torch.long)
        if counter:
            pass
        int(counter), counter.item(), counter.tolist()
    assert [name for name, _ in calls] == ['__bool__', '__int__', 'item', 'tolist']


def _sync_worker(rank, store, results):
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(rank)
        found = {}
        for mode in ('default', 'paper'):
            kwargs = dict(MODES[mode])
            calls = host_reads_in_steady_state(SyncCBN, gen=gen, **kwargs)
            found[mode] = [where for _, where in calls]
        torch.save(found, f'{results}.{rank}')
    finally:
        dist.destroy_process_group()


def test_sync_cbn_step_reads_nothing_back(tmp_path):
    mp.start_processes(_sync_worker, args=(str(tmp_path / 'store'), str(tmp_path / 'out')),
                       nprocs=2, start_method='spawn')
    for rank in range(2):
        found = torch.load(tmp_path / f'out.{rank}')
        for mode, calls in found.items():
            assert calls == [], (rank, mode, calls[0])


class _FakeRunner:
    """What CBNHook.after_train_iter reads of a runner."""

    def __init__(self, interval, length):
        from mmengine.hooks import LoggerHook
        from mmengine.logging import MessageHub
        self.hooks = [LoggerHook(interval=interval)]
        self.message_hub = MessageHub.get_instance('cbn_host_sync_test')
        self.train_dataloader = list(range(length))
        self.iter = 0


def test_hook_reads_diagnostics_only_when_the_logger_writes():
    torch.manual_seed(0)
    model = Net(CBN, window_size=3)
    hook = cbn_plugin.CBNHook(burn_in_iters=0)
    hook._layers = [model.bn1, model.bn2]
    cbn_plugin.bind(model, logger=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    runner = _FakeRunner(interval=4, length=100)
    train_steps(model, opt, 4)
    logged = []
    computed = []
    for batch_idx in range(4, 12):
        hook.before_train_iter(runner, batch_idx)
        train_steps(model, opt, 1)
        computed.append('mean_shift' in model.bn1.diagnostics)
        with trapped_host_reads() as calls:
            hook.after_train_iter(runner, batch_idx)
        runner.iter += 1
        logged.append((batch_idx, len(calls)))
    # LoggerHook writes after batch 7 and 11 (every 4th): the only reads, one each,
    # and the only steps whose layers computed the figures.
    assert logged == [(b, 1 if (b + 1) % 4 == 0 else 0) for b in range(4, 12)]
    assert computed == [(b + 1) % 4 == 0 for b in range(4, 12)]
    shift = runner.message_hub.get_scalar('train/cbn_mean_shift').current()
    assert shift > 0
