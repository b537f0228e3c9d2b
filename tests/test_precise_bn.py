"""Precise inference statistics for CBN: ``cbn_plugin.precise_bn``.

- :func:`recompute_statistics` on a float64 network (conv, CBN k=3, conv,
  plain BN, conv, CBN k=2) equals a brute-force estimate written out layer by
  layer: for every batch t, the raw activations of batches t-k+1..t
  concatenated, their biased per-channel mean and variance normalising batch
  t (so every later layer sees what training fed it), and the average over
  the full windows of the mean and of the variance times T/(T-1);
- the replay normalises every batch exactly as the CBN layer itself does in
  training when the weights do not move (a learning rate of 0);
- with ``window=1`` it equals MMPretrain's ``PreciseBNHook`` procedure
  (``update_bn_stats``, replayed here: momentum 1, ``no_grad``, the average
  of each batch's running statistics), which is what that hook gives a CBN;
  and that differs from the CBN estimate by far: the reason ``CBNHook``
  refuses a ``PreciseBNHook`` (tested too);
- nothing else changes (parameters, CBN windows and step counters,
  ``num_batches_tracked``, the modules' train/eval modes); bad arguments are
  refused by name;
- SyncCBN/SyncBN on 2 gloo processes, half of every batch each, equal CBN/BN
  on one process with the whole batches;
- ``PreciseCBNHook`` in a Runner sets the statistics the function gives and
  leaves the training itself bit-identical (RNG states put back);
- ``tools/precise_cbn.py`` on a detector checkpoint trained by
  ``tools/train.py``: only the running statistics of the FPN/head norms
  change, the file loads with plain ``torch.load``.
"""
from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import cbn_plugin
from cbn_plugin.hook import CBNHook
from cbn_plugin.precise_bn import PreciseCBNHook, recompute_statistics
from helpers import REPO, ToyData, ToyNet, tiny_runner, unseeded_config
from precise_net import make_batches, make_net

pytestmark = pytest.mark.usefixtures('keep_default_scope')


def brute_force(net, batches, windows):
    """The population estimate, from the raw activations of every window, layer by layer."""
    def channels(h):  # N, C, H, W -> C, N*H*W
        return h.transpose(0, 1).reshape(h.shape[1], -1)

    estimates = {}
    inputs = list(batches)
    for conv, norm, name in ((net.conv1, net.norm1, 'norm1'), (net.conv2, net.norm2, 'norm2'),
                             (net.conv3, net.norm3, 'norm3')):
        k = windows[name]
        raw = [conv(x) for x in inputs]
        outputs, means, variances = [], [], []
        for t, h in enumerate(raw):
            pooled = torch.cat([channels(r) for r in raw[max(0, t - k + 1):t + 1]], 1)
            mean, var = pooled.mean(1), pooled.var(1, unbiased=False)
            if t >= k - 1:
                total = pooled.shape[1]
                means.append(mean)
                variances.append(var * total / (total - 1))
            y = (h - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + norm.eps).sqrt()
            outputs.append(torch.relu(y * norm.weight.view(1, -1, 1, 1)
                                      + norm.bias.view(1, -1, 1, 1)))
        estimates[name] = (torch.stack(means).mean(0), torch.stack(variances).mean(0))
        inputs = outputs
    return estimates


def mmpretrain_update_bn_stats(model, batches):
    """MMPretrain's ``update_bn_stats`` (mmpretrain/engine/hooks/precise_bn_hook.py), replayed."""
    model.train()
    bn_layers = [m for m in model.modules()
                 if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    means = [torch.zeros_like(bn.running_mean) for bn in bn_layers]
    variances = [torch.zeros_like(bn.running_var) for bn in bn_layers]
    momentums = [bn.momentum for bn in bn_layers]
    for bn in bn_layers:
        bn.momentum = 1.0
    with torch.no_grad():
        for x in batches:
            model(x)
            for i, bn in enumerate(bn_layers):
                means[i] += bn.running_mean / len(batches)
                variances[i] += bn.running_var / len(batches)
    for i, bn in enumerate(bn_layers):
        bn.running_mean, bn.running_var, bn.momentum = means[i], variances[i], momentums[i]


def trained_state(net):
    """Give the CBN layers a window and step count, as after training."""
    cbn_plugin.bind(net)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for x in make_batches(4, 2):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
        cbn_plugin.step(net)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_recompute_equals_brute_force_population_estimate():
    net = make_net()
    before = trained_state(net)
    assert int(net.norm1.window_filled[0]) == 2
    net.eval()
    batches = make_batches()
    report = recompute_statistics(net, batches, len(batches))
    assert not net.training and not net.drop.training  # modes put back
    want = brute_force(net, batches, dict(norm1=3, norm2=1, norm3=2))
    for name, (mean, var) in want.items():
        layer = getattr(net, name)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-10, atol=1e-12, msg=name)
    assert {n: (r['window'], r['estimates']) for n, r in report.items()} == {
        'norm1': (3, 7), 'norm2': (1, 9), 'norm3': (2, 8)}
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f'{n}.{s}' for n in want for s in ('running_mean', 'running_var')}


def test_replay_normalises_as_the_layer_does_in_training_with_fixed_weights():
    """The replay's outputs are the CBN layer's own training outputs when the weights do not move."""
    batches = make_batches()
    torch.manual_seed(0)
    conv, layer = nn.Conv2d(3, 4, 3).double(), cbn_plugin.CBN(4, window_size=3).double()
    net = nn.Sequential(conv, layer)
    cbn_plugin.bind(net)
    net.train()
    trained = []
    for x in batches:  # training steps with a learning rate of 0
        trained.append(net(x).detach())
        cbn_plugin.step(net)
    replayed = []
    handle = net.register_forward_hook(lambda m, a, out: replayed.append(out.detach()))
    recompute_statistics(net, batches, len(batches), forward=lambda m, b: m(b))
    handle.remove()
    assert len(replayed) == len(trained)
    for t, (got, want) in enumerate(zip(replayed, trained)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=f'batch {t}')


def test_window_one_is_mmpretrain_precise_bn_which_is_wrong_for_cbn():
    batches = make_batches()
    ours, theirs = make_net(), make_net()
    trained_state(ours), trained_state(theirs)
    mmpretrain_update_bn_stats(theirs, batches)
    recompute_statistics(ours, batches, len(batches), window=1)
    for name in ('norm1', 'norm2', 'norm3'):
        for key in ('running_mean', 'running_var'):
            torch.testing.assert_close(getattr(ours, f'{name}').__getattr__(key),
                                       getattr(theirs, name).__getattr__(key),
                                       rtol=1e-9, atol=1e-12, msg=(name, key))
    # What PreciseBNHook gives a CBN with a window is not what it normalised with.
    want = brute_force(make_net(), batches, dict(norm1=3, norm2=1, norm3=2))
    gap = ((theirs.norm1.running_var - want['norm1'][1]).abs() / want['norm1'][1]).max()
    assert gap > 0.1, gap


def test_cbn_hook_refuses_mmpretrain_precise_bn_hook():
    class PreciseBNHook:  # what MMPretrain registers; only its name is looked at
        pass

    class FakeRunner:
        cfg = None
        model = make_net()
        hooks = [PreciseBNHook()]

    with pytest.raises(ValueError, match=r"PreciseBNHook .*window_size=3.*"
                                         r"dict\(type='PreciseCBNHook'"):
        CBNHook(burn_in_iters=0).before_train(FakeRunner())


def test_bad_arguments_are_refused_by_name():
    net, batches = make_net(), make_batches(4)
    with pytest.raises(ValueError, match='num_batches=2 gives no full window .* window 3'):
        recompute_statistics(net, batches, 2)
    with pytest.raises(ValueError, match='num_batches must be an integer >= 1, got 0'):
        recompute_statistics(net, batches, 0)
    with pytest.raises(ValueError, match=r"window must be an integer >= 1 \(or None: each CBN "
                                         r"layer's window_size\), got 'x'"):
        recompute_statistics(net, batches, 4, window='x')
    with pytest.raises(ValueError, match='ran out after 4 of num_batches=6'):
        recompute_statistics(net, batches, 6)
    with pytest.raises(ValueError, match='PreciseCBNHook num_batches must be an integer >= 1'):
        PreciseCBNHook(num_batches=-1)
    with pytest.raises(ValueError, match='PreciseCBNHook interval must be an integer >= 1, got 0'):
        PreciseCBNHook(interval=0)
    with pytest.raises(ValueError, match=r'PreciseCBNHook window must be an integer >= 1 .*got 0'):
        PreciseCBNHook(window=0)


# ---------------------------------------------------------------- in a Runner
def train_runner(work_dir, hooks):
    torch.manual_seed(0)
    runner = tiny_runner(
        work_dir, ToyNet(dropout=0.5), ToyData(shift=1.0),
        experiment_name=f'precise_{work_dir.name}_{id(work_dir)}',
        hooks=[dict(type='CBNHook', burn_in_iters=1), *hooks,
               dict(type='WeightsOnlyCheckpointHook')],
        randomness=dict(seed=3))
    runner.train()
    return runner


def test_precise_cbn_hook_in_a_runner(tmp_path):
    plain = train_runner(tmp_path / 'plain', [])
    precise = train_runner(tmp_path / 'precise', [dict(type='PreciseCBNHook', num_batches=4)])
    a, b = plain.model.state_dict(), precise.model.state_dict()
    # Training itself is untouched (same data order, dropout draws, updates).
    for key in a:
        if not key.endswith(('running_mean', 'running_var')):
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a['bn.running_var'], b['bn.running_var'])
    # The statistics are the function's, on the final weights and the same batches.
    again = copy.deepcopy(plain.model)
    recompute_statistics(again, plain.train_dataloader, 4)
    torch.testing.assert_close(b['bn.running_var'], again.bn.running_var, rtol=0, atol=0)
    torch.testing.assert_close(b['bn.running_mean'], again.bn.running_mean, rtol=0, atol=0)
    saved = torch.load(tmp_path / 'precise' / 'epoch_2.pth')['state_dict']
    assert torch.equal(saved['bn.running_var'], b['bn.running_var'])  # saved after it ran


# ---------------------------------------------------------------- the tool
def test_tool_on_a_trained_detector(tmp_path):
    from tiny_coco import write_tiny_coco
    data = write_tiny_coco(tmp_path / 'coco', num_images=6, seed=3)
    config = tmp_path / 'cbn.py'
    config.write_text(unseeded_config(data) + 'train_cfg = dict(max_epochs=1)\n')
    env = dict(__import__('os').environ, OMP_NUM_THREADS='1')
    run = subprocess.run([sys.executable, 'tools/train.py', str(config), '--work-dir',
                          str(tmp_path / 'work')], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    checkpoint = tmp_path / 'work' / 'epoch_1.pth'
    out = tmp_path / 'precise.pth'
    run = subprocess.run([sys.executable, 'tools/precise_cbn.py', str(config), str(checkpoint),
                          '--num-batches', '5', '--out', str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f'from 5 batches: {out}' in run.stdout
    assert re.search(r'neck\.fpn_convs\.0\.bn +window 4 +estimates 2 ', run.stdout), run.stdout
    assert 'recomputed 12 norm layers' in run.stdout  # FPN and head; the norm_eval backbone not
    before, after = torch.load(checkpoint), torch.load(out)  # weights_only
    changed = {k for k, v in before['state_dict'].items()
               if not torch.equal(v, after['state_dict'][k])}
    assert changed and all(k.endswith(('running_mean', 'running_var')) for k in changed)
    assert 'neck.fpn_convs.0.bn.running_var' in changed
    assert 'roi_head.bbox_head.shared_convs.0.bn.running_var' in changed
    for key in ('optimizer', 'meta', 'rng_state'):
        assert key in after


# ---------------------------------------------------------------- SyncCBN, 2 processes
SYNC_SCRIPT = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import cbn_plugin
from cbn_plugin.precise_bn import recompute_statistics
from precise_net import make_batches, make_net

rank = int(sys.argv[1])
dist.init_process_group('gloo', init_method='file://' + {store!r}, rank=rank, world_size=2)
net = make_net()
net = cbn_plugin.convert_sync_cbn(net)
assert isinstance(net.norm1, cbn_plugin.SyncCBN)
batches = [b[rank::2] for b in make_batches(size=4)]  # this rank's half of every batch
recompute_statistics(net, batches, len(batches))
torch.save({{k: v for k, v in net.state_dict().items() if 'running' in k}},
           {out!r} + f'/rank{{rank}}.pth')
dist.destroy_process_group()
'''


def test_sync_cbn_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """SyncCBN (and torch's SyncBatchNorm, which convert_sync_cbn makes of the plain BN) on 2
    ranks with half of every batch each == CBN/BN on one process with the whole batches."""
    script = tmp_path / 'sync.py'
    script.write_text(SYNC_SCRIPT.format(repo=str(REPO), tests=str(REPO / 'tests'),
                                         store=str(tmp_path / 'store'), out=str(tmp_path)))
    env = dict(__import__('os').environ, OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    ranks = [torch.load(tmp_path / f'rank{r}.pth') for r in range(2)]
    whole = make_net()
    batches = make_batches(size=4)
    recompute_statistics(whole, batches, len(batches))
    for name in ('norm1', 'norm2', 'norm3'):  # the global batch, identical on both ranks
        for key in ('running_mean', 'running_var'):
            full = f'{name}.{key}'
            assert torch.equal(ranks[0][full], ranks[1][full]), full
            torch.testing.assert_close(ranks[0][full], getattr(whole, name).__getattr__(key),
                                       rtol=1e-10, atol=1e-12, msg=full)
