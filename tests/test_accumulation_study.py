"""tools/analysis_tools/accumulation_study.py and the study runner's gradient accumulation.

The runner's accumulation is checked against what it must equal: with a norm that does not
depend on the batch (GroupNorm), A micro-batches of one image with loss / A and one optimizer
step train exactly like the A images in one batch; with BN they must not (each micro-batch is
normalised on its own). A tiny study run must have every row, and its accumulated rows must
have taken one optimizer step (and one CBN step) per A forward calls.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'analysis_tools' / 'accumulation_study.py'
sys.path.insert(0, str(TOOL.parent))

from small_batch.runner import train_run  # noqa: E402


def _cfg(norm, accumulate, samples=64, seed=0):
    return dict(task='shift5', arch='resnet', norm=norm, batch=4, accumulate=accumulate,
                samples=samples, lr=0.05, seed=seed, measure=0)


def test_accumulation_with_a_batch_free_norm_is_the_large_batch():
    """GN: 1 x 4 accumulated == 4 images per step (same losses, same accuracy)."""
    large = train_run(_cfg(dict(kind='gn'), 1))
    accumulated = train_run(_cfg(dict(kind='gn'), 4))
    assert (large['steps_done'], large['forward_calls']) == (16, 16)
    assert (accumulated['steps_done'], accumulated['forward_calls']) == (16, 64)
    assert accumulated['final_loss'] == pytest.approx(large['final_loss'], rel=1e-4, abs=1e-5)
    assert accumulated['acc'] == pytest.approx(large['acc'], abs=2 / 719)


def test_accumulated_bn_normalises_each_micro_batch():
    """BN: the micro-batches of one image are normalised on their own, so the run differs
    from BN at 4 images per step (it would not if the runner silently ran the large batch)."""
    large = train_run(_cfg(dict(kind='bn'), 1))
    accumulated = train_run(_cfg(dict(kind='bn'), 4))
    assert abs(accumulated['final_loss'] - large['final_loss']) > 1e-3


def test_accumulate_must_divide_the_batch():
    with pytest.raises(ValueError, match=r'accumulate must be an integer >= 1 dividing batch=4'):
        train_run(_cfg(dict(kind='bn'), 3))


def test_tiny_study_has_every_row_and_accumulates(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), '--tiny', '--out-dir', str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import accumulation_study as acc
    data = json.loads((tmp_path / 'accumulation.json').read_text())
    runs, samples = data['runs'], data['args']['samples']
    assert data['missing'] == []
    assert {r['cfg']['row'] for r in runs} == set(acc.ROWS)
    md = (tmp_path / 'accumulation.md').read_text()
    for kind in acc.ROWS:
        assert f'| {acc.row_label(kind, 4, 1)} |' in md
    for r in runs:
        cfg = r['cfg']
        assert r['status'] == 'ok' and 0.0 <= r['acc_precise'] <= 1.0
        assert cfg['batch'] == 4 and cfg['lr'] == pytest.approx(0.1 * 4 / 32)
        accumulated = acc.ROWS[cfg['row']][2]
        assert cfg['accumulate'] == (4 if accumulated else 1)
        # one optimizer step per 4 images; one forward per micro-batch
        assert r['steps_done'] == samples // 4
        assert r['forward_calls'] == (samples if accumulated else samples // 4)
        if cfg['norm']['kind'] == 'cbn':  # 32 / images per step; BN over the step: none
            assert cfg['norm']['window'] == (1 if cfg['row'] == 'bn_step' else 8)
        if accumulated and cfg['norm']['kind'] == 'cbn':
            layer = r['layer']
            assert layer['steps_done'] == samples // 4  # cbn_plugin.step once per step
            # (a two-pass layer without its statistics pass fails the run: status above)
            assert layer['accumulation'] == {
                'cbn_own': 'own', 'cbn_two_pass': 'two_pass', 'rho0_two_pass': 'two_pass',
                'bn_step': 'two_pass'}.get(cfg['row'], 'merge')
            assert layer['rho'] == {'rho0_merge': 0.0, 'rho05_merge': 0.5,
                                    'rho0_two_pass': 0.0}.get(cfg['row'], 1.0)
            assert layer['momentum'] == (0.1 / 4 if cfg['row'] == 'merge_momentum' else 0.1)
    assert (tmp_path / 'accumulation.png').read_bytes()[:4] == b'\x89PNG'
    # re-rendering from the json reproduces the generated block
    block = md.split(acc.DOC_BEGIN)[1].split(acc.DOC_END)[0]
    proc = subprocess.run([sys.executable, str(TOOL), '--from-json',
                           str(tmp_path / 'accumulation.json'), '--out-dir', str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = (tmp_path / 'accumulation.md').read_text()
    assert again.split(acc.DOC_BEGIN)[1].split(acc.DOC_END)[0] == block
