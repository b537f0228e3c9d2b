"""SyncCBN: 2 processes with batch b equal 1 process with batch 2b and CBN (gloo, CPU)."""
import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import cbn_plugin
from cbn_plugin import CBN, SyncCBN

STEPS, HALF = 6, 2


class Net(nn.Module):
    def __init__(self, norm, **kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.bn1 = norm(6, **kwargs)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = norm(4, **kwargs)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def make(norm, **kwargs):
    torch.manual_seed(0)
    model = Net(norm, **kwargs).double()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    cbn_plugin.bind(model, logger=None)
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(2 * HALF, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 3
        target = torch.randn(2 * HALF, 4, 3, 3, generator=gen, dtype=torch.float64)
        yield x, target


def train(model, rank=None, kwargs=None, empty_step=None):
    """Per step: output, input gradient, parameter gradients (summed over processes).

    With the compensated backward, each process's gradient through the past
    entries is its own loss's: summed (DDP averages) they are the full batch's.
    At ``empty_step`` process 1 has an empty batch (a RoI head without RoIs):
    the single process then sees process 0's half only.
    """
    log = []
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step, (x, target) in enumerate(batches()):
        if rank is not None:
            end = rank * HALF if (step, rank) == (empty_step, 1) else (rank + 1) * HALF
            x, target = x[rank * HALF:end], target[rank * HALF:end]
        elif step == empty_step:
            x, target = x[:HALF], target[:HALF]
        x = x.clone().requires_grad_(True)
        out = model(x)
        (out * target).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        if rank is not None:
            for g in grads:
                dist.all_reduce(g)
            for p, g in zip(model.parameters(), grads):
                p.grad.copy_(g)
        opt.step()
        opt.zero_grad()
        cbn_plugin.step(model)  # (the running statistics are updated here)
        log.append(dict(out=out.detach(), dx=x.grad, grads=grads,
                        state={k: v.clone() for k, v in model.state_dict().items()}))
    return log


def worker(rank, store, kwargs, results, empty_step=None):
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    try:
        torch.save(train(make(SyncCBN, **kwargs), rank, empty_step=empty_step),
                   f'{results}.{rank}')
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('kwargs', [dict(window_size=3), dict(window_size=3, mode='paper'),
                                    dict(window_size=3, compensation='mu_nu',
                                         variance_rule='exclude'),
                                    dict(window_size=1),
                                    dict(window_size=3, rho=0.0, variance_rule='exclude')],
                         ids=['cbn', 'cbn-paper', 'cbn-mu_nu-exclude', 'window1-syncbn',
                              'naive-exclude'])
def test_two_processes_equal_one_with_the_double_batch(tmp_path, kwargs):
    two_processes_equal_one(tmp_path, kwargs)


@pytest.mark.parametrize('kwargs', [dict(window_size=3), dict(window_size=3, mode='paper')],
                         ids=['cbn', 'cbn-paper'])
def test_a_process_with_an_empty_batch_still_joins(tmp_path, kwargs):
    """Process 1 has no samples at step 3 (its window full): it joins both
    all-reduces, gets an empty output, and the window stays identical everywhere."""
    two_processes_equal_one(tmp_path, kwargs, empty_step=3)


def two_processes_equal_one(tmp_path, kwargs, empty_step=None):
    mp.start_processes(worker, args=(str(tmp_path / 'store'), kwargs, str(tmp_path / 'log'),
                                     empty_step), nprocs=2, start_method='spawn')
    logs = [torch.load(tmp_path / f'log.{rank}') for rank in range(2)]
    single = train(make(CBN, **kwargs), empty_step=empty_step)
    for step, expect in enumerate(single):
        for rank, log in enumerate(logs):
            got, part = log[step], slice(rank * HALF, (rank + 1) * HALF)
            torch.testing.assert_close(got['out'], expect['out'][part], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(got['dx'], expect['dx'][part], rtol=1e-9, atol=1e-10)
            for g, e in zip(got['grads'], expect['grads']):
                torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)
            for key, value in expect['state'].items():
                torch.testing.assert_close(got['state'][key], value, rtol=1e-8, atol=1e-10,
                                           msg=f'step {step} {key}')
    assert single[-1]['state'].keys() == logs[0][-1]['state'].keys()
    if kwargs['window_size'] > 1:
        assert 'bn1.window_grad_var' in logs[0][-1]['state'] or kwargs.get('rho') == 0.0


def test_without_process_group_behaves_as_cbn_with_one_warning():
    sync, plain = make(SyncCBN, window_size=3), make(CBN, window_size=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        a, b = train(sync), train(plain)
    assert sum('SyncCBN: no initialised process group' in str(w.message) for w in caught) == 2
    for x, y in zip(a, b):
        torch.testing.assert_close(x['out'], y['out'], rtol=0, atol=0)


def test_sampled_derivatives_are_refused():
    with pytest.raises(ValueError, match='SyncCBN supports only exact derivatives .* '
                                         'dvar_stride=2'):
        SyncCBN(8, dvar_stride=2)


def test_sync_cbn_is_registered():
    from mmcv.cnn import build_norm_layer
    name, layer = build_norm_layer(dict(type='SyncCBN', window_size=2), 8)
    assert name == 'bn' and type(layer) is SyncCBN
    assert copy.deepcopy(layer).window_size == 2
