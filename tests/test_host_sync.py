"""No host synchronisation in a steady-state training step.

On a GPU every ``.item()``, ``int(t)``, ``float(t)``, ``if t:``, ``t.tolist()``
or a tensor used as a Python index waits for the device's queue to drain, and so
does a host-to-device copy from pageable memory: ``torch.tensor(data)``,
``t.new_tensor(data)``, an index given as a Python list, ``.to(device)`` of a host
tensor. A steady-state step (forward, backward, optimizer step,
``cbn_plugin.step``) of CBN and SyncCBN must make none, in every mode, and
``CBNHook`` reads its diagnostics only on the iterations the logger writes. The
trap counts every call of those ``Tensor`` methods, and every tensor made from
host data or copied from the host to another device, while it is set.
"""
import contextlib
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import cbn_plugin
from cbn_plugin import CBN, SyncCBN
from helpers import on_two_ranks

HOST_READS = ('item', '__int__', '__float__', '__bool__', '__index__', 'tolist')


class _HostToDevice(TorchDispatchMode):
    """Records ``('host data' or 'host-to-device copy', where)`` for every tensor made from
    host data (``lift_fresh``: ``torch.tensor``, ``new_tensor``, a list index; on a GPU a
    copy to the device) and every copy from the host to another device."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        target = kwargs.get('device')
        if name == 'aten.lift_fresh.default':
            self.calls.append(('host data', ''.join(traceback.format_stack(limit=8)[:-1])))
        elif (name == 'aten._to_copy.default' and args[0].device.type == 'cpu'
              and target is not None and torch.device(target).type != 'cpu') or (
                name == 'aten.copy_.default' and args[1].device.type == 'cpu'
                and args[0].device.type != 'cpu'):
            self.calls.append(('host-to-device copy',
                               ''.join(traceback.format_stack(limit=8)[:-1])))
        return func(*args, **kwargs)


@contextlib.contextmanager
def trapped_host_reads():
    """Record (method, where) for every host read of a tensor, and every host-to-device
    copy, while in the block."""
    calls, originals = [], {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append((name, ''.join(traceback.format_stack(limit=8)[:-1])))
            return original(self, *args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, spy(name, original))
    try:
        with _HostToDevice(calls):
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


def test_a_ramping_window_reads_and_copies_nothing():
    """While the window ramps up each step pools a new set of slots (a new mask)."""
    torch.manual_seed(0)
    model = Net(CBN, window_size=4)
    cbn_plugin.bind(model, logger=None)
    for layer in (model.bn1, model.bn2):
        layer.set_schedule(burn_in_steps=1, ramp_steps=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train_steps(model, opt, 2)
    with trapped_host_reads() as calls:
        windows = []
        for _ in range(5):
            train_steps(model, opt, 1)
            windows.append(model.bn1.diagnostics['window'])
    assert windows == [2, 2, 3, 3, 4], windows  # the ramp (new masks) ran in the trap
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


def test_the_trap_catches_host_to_device_copies():
    """A count built from a host number, a mask indexed by a Python list, a host tensor
    sent to another device (``meta``: this machine has no GPU)."""
    x = torch.zeros(3)
    with trapped_host_reads() as calls:
        x.new_tensor([float(6)])
        mask = torch.zeros(3, dtype=torch.bool)
        mask[[0, 2]] = True
        mask.to('meta')
        torch.zeros(3, device='meta').copy_(x)
    names = [name for name, _ in calls]
    # (the list index makes two host tensors: the index and the value)
    assert names.count('host data') >= 2 and names.count('host-to-device copy') == 2, names
    assert set(names) == {'host data', 'host-to-device copy'}, names


def _sync_host_reads(rank):
    gen = torch.Generator().manual_seed(rank)
    found = {}
    for mode in ('default', 'paper'):
        kwargs = dict(MODES[mode])
        calls = host_reads_in_steady_state(SyncCBN, gen=gen, **kwargs)
        found[mode] = [where for _, where in calls]
    return found


def test_sync_cbn_step_reads_nothing_back(tmp_path):
    for rank, found in enumerate(on_two_ranks(tmp_path, _sync_host_reads)):
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
