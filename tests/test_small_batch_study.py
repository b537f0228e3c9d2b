"""tools/analysis_tools/small_batch_study.py: the statistics-error analysis against oracles,
and a tiny run.

The analysis pushes the window's old raw batches through the current network. On a
single conv followed by CBN the paper's truncation is exact, so the answers are known in
closed form: the compensated mean is the true mean, and a first-order step on the variance
misses exactly dW^T C dW (C the old batch's patch covariance), while the paper's (mu, nu)
form misses d_mu^2 more. These are computed here independently from the raw patches and
the saved old weights.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'analysis_tools' / 'small_batch_study.py'
sys.path.insert(0, str(TOOL.parent))

import small_batch as sbs  # noqa: E402

import cbn_plugin  # noqa: E402


def _train(arch, spec, steps, lr, batch=8, analyse_at=None, seed=0):
    """Train ``steps`` SGD steps on the 4x4 digits with a NormProbe; optionally analyse.

    Returns (model, probe, analysis, inputs, weights): ``inputs`` the raw batch of every
    step, ``weights`` the first conv's weight at every step's forward.
    """
    torch.manual_seed(seed)
    xtr, ytr, _, _ = sbs.load_task('lowres')
    model = sbs.ARCHS[arch](spec)
    model.build = lambda: sbs.ARCHS[arch](spec)
    cbn_plugin.bind(model, logger=None)
    probe = sbs.NormProbe(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    gen = torch.Generator().manual_seed(seed)
    history = deque(maxlen=max(1, spec.get('window', 1) - 1))
    inputs, weights, analysis = [], [], None
    population = xtr[:256]
    for s in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        xb, yb = xtr[idx], ytr[idx]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        inputs.append(xb)
        weights.append(conv.weight.detach().clone())
        if s == analyse_at:
            analysis = probe.analyse(model, list(reversed(history)), population)
        opt.step()
        cbn_plugin.step(model)
        history.append(xb)
    return model, probe, analysis, inputs, weights


def _patch_moments(x):
    """Mean patch and (biased) patch covariance of a 3x3, padding-1 conv over ``x``."""
    p = F.unfold(x.double(), 3, padding=1).transpose(1, 2).reshape(-1, 9)
    mean = p.mean(0)
    centred = p - mean
    return mean, centred.T @ centred / p.shape[0]


def _oracle(inputs, weights, step, window):
    """Closed-form truths for the past entries of a one-conv CBN at ``step``."""
    w_now = weights[step].double().flatten(1)
    out = {k: 0.0 for k in ('true_var', 'dwcdw', 'dmu2', 'mean_naive_sq', 'count')}
    for age in range(1, window):
        x_old, w_old = inputs[step - age], weights[step - age].double().flatten(1)
        p_bar, cov = _patch_moments(x_old)
        dw = w_now - w_old
        true_mean, true_var = w_now @ p_bar, ((w_now @ cov) * w_now).sum(1)
        old_mean = w_old @ p_bar
        out['true_var'] += float(true_var.sum())
        out['dwcdw'] += float(((dw @ cov) * dw).sum())
        out['dmu2'] += float(((dw @ p_bar) ** 2).sum())
        out['mean_naive_sq'] += float((((old_mean - true_mean) ** 2) / true_var).sum())
        out['count'] += true_var.numel()
    return out


def test_oneconv_analysis_matches_closed_form():
    window, step = 4, 9
    spec = dict(kind='cbn', window=window, rho=1.0)
    _, _, analysis, inputs, weights = _train('oneconv', spec, step + 1, lr=0.2,
                                             analyse_at=step)
    m = analysis['features.1']
    assert m['ages'] == window - 1
    # the analysis's own copy of the compensation is the layer's
    assert m['check_mean'] < 1e-6 and m['check_var'] < 1e-6
    ref = _oracle(inputs, weights, step, window)
    # the weights really moved: naive pooling is off, compensation is exact for the mean
    naive = (ref['mean_naive_sq'] / ref['count']) ** 0.5
    assert naive > 1e-2
    assert m['entry_mean_err_naive'] == pytest.approx(naive, rel=1e-3)
    assert m['entry_mean_err_comp'] < 1e-4 * naive
    assert m['win_mean_err_cbn'] < 1e-4 * m['win_mean_err_naive']
    # variance: var-form misses dW^T C dW, the (mu, nu) form misses d_mu^2 more
    assert ref['dwcdw'] > 1e-4 * ref['true_var'] and ref['dmu2'] > 1e-4 * ref['true_var']
    assert m['entry_var_bias_varform'] == pytest.approx(-ref['dwcdw'] / ref['true_var'],
                                                        rel=1e-3, abs=1e-6)
    assert m['entry_dmu2'] == pytest.approx(ref['dmu2'] / ref['true_var'], rel=1e-3, abs=1e-6)
    assert m['entry_var_bias_comp'] == pytest.approx(
        -(ref['dwcdw'] + ref['dmu2']) / ref['true_var'], rel=1e-3, abs=1e-6)
    assert m['dmu2_share_of_under'] == pytest.approx(
        ref['dmu2'] / (ref['dwcdw'] + ref['dmu2']), rel=1e-3)


def test_lr_zero_window_errors_vanish():
    spec = dict(kind='cbn', window=4, rho=1.0)
    _, _, analysis, _, _ = _train('oneconv', spec, 8, lr=0.0, analyse_at=7)
    m = analysis['features.1']
    for key in ('naive', 'cbn', 'munu', 'varform'):
        assert m[f'win_mean_err_{key}'] < 1e-5
        assert m[f'win_std_err_{key}'] < 1e-5
    assert m['entry_dmu2'] < 1e-10 and abs(m['entry_var_bias_naive']) < 1e-5
    # the current batch alone is not the window: the reference is not trivially matched
    assert m['win_mean_err_current'] > 1e-2


@pytest.mark.parametrize('backward', ['current', 'compensated'])
def test_gradient_fidelity_oracle_at_lr_zero(backward):
    """One conv, weights frozen by lr=0: the pooled statistics ARE large-batch BN's.

    Then the layer's exact backward ('compensated': the past entries differentiated
    through their compensation) gives exactly the large-batch gradient (cosine 1), while
    the paper's and the pooled backward do not. Every CBN gradient is the layer's own,
    from a copy loaded from the state_dict; the copy under the run's own backward is the
    training step's gradient.
    """
    spec = dict(kind='cbn', window=8, rho=1.0, backward=backward)
    model, probe, analysis, inputs, _ = _train('oneconv', spec, 9, lr=0.0, batch=2,
                                               analyse_at=8)
    assert probe.layers[0][1].stats_backward == backward
    xtr, ytr, _, _ = sbs.load_task('lowres')
    assert analysis['features.1']['win_std_err_cbn'] < 1e-5  # the forward is exact here
    # _train stepped after its last batch: the window now holds steps 8, 7, ..., 2
    old = list(reversed(inputs[2:9]))
    xb, yb = xtr[100:102], ytr[100:102]
    # a fresh training step's forward and backward (the window is full), then the gradients
    model.zero_grad()
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    result = sbs.gradient_fidelity(model, probe, model.build, old, xb, yb,
                                    float(loss.detach()))
    assert result['check'] < 1e-6  # the copy's gradient is the training step's
    assert result['check_forward'] < 1e-6
    assert result['cos_compensated'] > 1 - 1e-5
    assert result['cos_current'] < 0.99 and result['cos_pooled'] < 0.99
    # the copies left the trained layer's step alone: it still steps as one step
    layer = probe.layers[0][1]
    steps = layer.steps_done
    cbn_plugin.step(model)
    assert layer.steps_done == steps + 1


def test_rows_build_the_layer_users_get():
    """The defaults' row is CBN(c, window_size=k); CBN() (k=4) is CBN(c); the paper row is
    mode='paper'; every row's layer has the backward and compensation its label says."""
    from cbn_plugin.layer import CrossIterationBatchNorm2d as CBN
    assert sbs.cbn_kwargs(sbs.spec_for(sbs.DEFAULT, 2)) == {'window_size': 16}
    assert sbs.cbn_kwargs(sbs.spec_for(sbs.PLAIN, 2)) == {}
    assert sbs.spec_for(sbs.PLAIN, 32)['window'] == CBN(4).window_size
    paper = sbs.make_norm(sbs.spec_for(sbs.PAPER, 1), 4)
    ref = CBN(4, window_size=32, mode='paper')
    for attr in ('stats_backward', 'compensation', 'running_stats', 'window_size', 'rho'):
        assert getattr(paper, attr) == getattr(ref, attr)
    for backward in sbs.BACKWARDS:
        for form in sbs.FORMS:
            layer = sbs.make_norm(sbs.spec_for(sbs.cbn_label(backward, form), 4), 4)
            assert (layer.stats_backward, layer.compensation, layer.window_size) == \
                (backward, form, 8)
    # window 1 is BN: at batch 32 every CBN row is the same norm (one run; the grid tells
    # runs apart by what they train, not by their label)
    assert all(sbs.spec_for(label, 32) == dict(kind='cbn', window=1) for label in sbs.CBN_COMBOS)


def test_replay_is_the_network_that_ran():
    """Replaying this step's own batch through the frozen network gives its statistics."""
    spec = dict(kind='cbn', window=4, rho=1.0)
    model, probe, _, inputs, _ = _train('cnn', spec, 6, lr=0.1)
    xb = inputs[-1]
    out_train = model(xb)  # a training forward at the current weights (window in use)
    (replayed,) = probe.replay(model, [xb])
    assert any(used for *_, used in probe.used.values())
    for name, (mean, var) in probe.cur.items():
        torch.testing.assert_close(replayed[name][0], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(replayed[name][1], var, rtol=1e-5, atol=1e-5)
    # and the eval-mode replay left the window and running statistics alone
    layer = cbn_plugin.cbn_layers(model)[0][1]
    assert int(layer.num_steps) == 6
    assert out_train.shape == (len(xb), 10)


@pytest.mark.parametrize('source', ['batch', 'window'])
def test_probe_running_stats_follow_the_layers_rule(source):
    spec = dict(kind='cbn', window=4, rho=1.0, running_stats=source)
    model, probe, _, _, _ = _train('cnn', spec, 8, lr=0.1)
    other = {'batch': 'window', 'window': 'batch'}[source]
    differs = 0.0
    for name, layer in probe.layers:
        torch.testing.assert_close(probe.ema[name][source][0], layer.running_mean)
        torch.testing.assert_close(probe.ema[name][source][1], layer.running_var)
        differs = max(differs, float((probe.ema[name][other][1] - layer.running_var).abs().max()))
    assert differs > 1e-4  # the two rules are really different


def test_tiny_study_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TOOL), '--tiny',
         '--workers', '1', '--out-dir', str(tmp_path)],
        capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / 'small_batch.json').read_text())
    runs = data['runs']
    groups = {r['cfg']['group'] for r in runs}
    assert groups == {'main', 'raw', 'resnet', 'second', 'sweep', 'lrsweep'}
    assert all(r['status'] == 'ok' for r in runs), [r['status'] for r in runs]
    main = [r for r in runs if r['cfg']['group'] == 'main']
    assert {r['cfg']['batch'] for r in main} == {8, 2}
    # every row: BN, GN, naive CBN, each backward x each compensation, CBN()
    assert {r['cfg']['label'] for r in main} == set(sbs.NORMS)
    for r in main:
        label, layer = r['cfg']['label'], r.get('layer')
        assert (layer is not None) == sbs.is_cbn(label)
        if label in sbs.CBN_COMBOS:  # the layer that trained has the row's options
            assert f'CBN ({layer["stats_backward"]}, {layer["compensation"]})' == label
            assert layer['window_size'] == 32 // r['cfg']['batch']
        if label == sbs.DEFAULT:
            assert layer['args'] == {'window_size': 32 // r['cfg']['batch']}
        if label == sbs.PLAIN:
            assert layer['args'] == {} and layer['window_size'] == 4
        if sbs.is_cbn(label):
            # both running-statistics rules evaluated on the same weights, and they differ
            assert r['running_error']['batch'] != r['running_error']['window']
            assert r['ema_check'] < 1e-6
    analysed = [r for r in runs if 'analysis' in r]
    checked = [m for r in analysed for m in r['analysis'].values() if 'check_mean' in m]
    assert checked and all(m['check_mean'] < 1e-5 and m['check_var'] < 1e-5 for m in checked)
    fid = [r['grad_fidelity'] for r in runs if 'grad_fidelity' in r]
    assert {r['cfg']['label'] for r in runs if 'grad_fidelity' in r} >= set(sbs.CBN_COMBOS)
    assert fid and all(f['check'] < 1e-5 and f['check_forward'] < 1e-5 for f in fid)
    assert all('cos_compensated' in r['grad_fidelity'] for r in runs
               if 'grad_fidelity' in r and r['cfg']['label'] in sbs.CBN_COMBOS)
    resnet = [r for r in runs if r['cfg']['group'] == 'resnet' and 'analysis' in r]
    assert resnet and 'bn1' in resnet[0]['analysis']  # the stem's norm is a CBN too
    md = (tmp_path / 'small_batch.md').read_text()
    assert sbs.DOC_BEGIN in md and sbs.DOC_END in md
    for label in sbs.CBN_COMBOS:
        for stats in ('batch', 'window'):
            assert f'| {sbs.display(label)}, running stats from {stats} |' in md
    assert '| CBN (current, mu_nu) = paper, running stats from batch |' in md
    assert '### The goal of the defaults' in md and '### Second setting' in md
    for png in ('small_batch.png', 'small_batch_errors.png'):
        assert (tmp_path / png).read_bytes()[:4] == b'\x89PNG'
    # re-rendering from the json reproduces the generated block
    block = md.split(sbs.DOC_BEGIN)[1].split(sbs.DOC_END)[0]
    proc = subprocess.run(
        [sys.executable, str(TOOL), '--from-json',
         str(tmp_path / 'small_batch.json'), '--out-dir', str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = (tmp_path / 'small_batch.md').read_text()
    assert again.split(sbs.DOC_BEGIN)[1].split(sbs.DOC_END)[0] == block


def test_precise_statistics_pipeline(tmp_path):
    """--precise: the same weights evaluated with recomputed statistics, every run."""
    proc = subprocess.run(
        [sys.executable, str(TOOL), '--precise', '--tiny',
         '--workers', '1', '--out-dir', str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / 'small_batch_precise.json').read_text())['runs']
    assert {(r['cfg']['label'], r['cfg']['batch']) for r in runs} == {
        ('BN', 32), ('BN', 2), (sbs.DEFAULT, 2)}
    for r in runs:
        assert r['status'] == 'ok' and 0.0 <= r['acc_precise'] <= 1.0
        assert r['precise_batches'] >= r['cfg']['norm'].get('window', 1)
    md = (tmp_path / 'small_batch_precise.md').read_text()
    assert md.count(sbs.PRECISE_BEGIN) == 1 and '| BN | 2 |' in md


def test_precise_accuracy_recomputes_every_layer():
    torch.manual_seed(0)
    xtr, ytr, xte, yte = sbs.load_task('lowres')
    model = sbs.SmallCNN(sbs.spec_for(sbs.DEFAULT, 2))
    cbn_plugin.bind(model, logger=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for s in range(20):
        F.cross_entropy(model(xtr[2 * s:2 * s + 2]), ytr[2 * s:2 * s + 2]).backward()
        opt.step()
        opt.zero_grad()
        cbn_plugin.step(model)
    before = {n: l.running_var.clone() for n, l in cbn_plugin.cbn_layers(model)}
    out = sbs.precise_accuracy(model, xtr, xte, yte, batch=2, samples=64)
    assert out['precise_batches'] == 32
    for name, layer in cbn_plugin.cbn_layers(model):
        assert not torch.allclose(layer.running_var, before[name]), name
    assert out['acc_precise'] == sbs.evaluate(model, xte, yte)
