"""tools/analysis_tools/window_sweep.py: which runs it plans, which it reuses, what it tables.

The runs themselves are the detection study's (tested in test_small_batch_detection); here
the folders hold results written the way that tool writes them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tools' / 'analysis_tools'))

import window_sweep as ws  # noqa: E402


def _result(out_dir: Path, name: str, mAP: float, cpu: float, status: str = 'ok') -> None:
    folder = out_dir / name
    folder.mkdir(parents=True)
    (folder / 'small_batch_detection.json').write_text(json.dumps(dict(
        machine='x86_64, 2 CPUs', when='2026-12-03 13:00',
        results=[dict(status=status, mAP=mAP, mAP50=mAP + 0.2, final_loss=0.7, cpu_s=cpu)])))


def test_plan_names_each_run_by_batch_pooled_images_and_seed():
    args = ws.parse_args(['--batches', '1', '2', '--windows', '4', '32', '--seeds', '0', '1'])
    names = [r['name'] for r in ws.plan(args)]
    assert names[:3] == ['gn_b1_L4_s0', 'cbn_b1_L4_s0', 'cbn_b1_L32_s0']
    assert 'cbn_b2_L64_s1' in names and len(names) == 2 * 2 * 3
    args = ws.parse_args(['--no-gn', '--windows', '8', '--seeds', '2'])
    assert [r['name'] for r in ws.plan(args)] == ['cbn_b1_L8_s2']


def test_each_run_s_command_trains_its_batch_seed_and_window(tmp_path):
    """The study, given a run's command line, builds the job the sweep names: CBN with
    the sweep's window (``--window``), GN with none; and that is the job the sweep trains."""
    import small_batch_detection as sbd
    args = ws.parse_args(['--batches', '2', '--windows', '16', '--seeds', '1'])
    rows = []
    for run in ws.plan(args):
        study = sbd.parse_args(ws.command(tmp_path / 'out', tmp_path / 'work', run)[2:])
        (row,) = study.rows
        job = sbd.make_job(row, sbd.setting_from_args(study), study.seeds[0], tmp_path,
                           study.work_dir / 'compare', window=study.window)
        assert (job['batch'], job['accum'], job['seed']) == (2, 1, 1)
        assert ws.job(run, tmp_path, tmp_path / 'work') == job
        rows.append((row, job['norm'].get('window'), job['norm'].get('cbn_args')))
    assert rows == [('gn', None, None), ('cbn', 16, dict(window_size=16))]


def test_sweep_trains_with_the_study_runner_and_tables_what_it_trained(tmp_path, monkeypatch):
    """The sweep's runs go through the study's runner (here in this process, its run_one
    replaced): each result lands in its run's folder, where the table finds it; a run whose
    folder holds a finished result is not trained again."""
    sbd = ws.sbd
    jobs_module = sys.modules[sbd.run_jobs.__module__]
    trained = []

    def fake_run_one(job, *args):
        trained.append((job['row'], job['batch'], job['norm'].get('window'), job['seed']))
        return dict(job=job, status='ok', mAP=0.5 + 0.01 * job['seed'], mAP50=0.8, mAP75=0.5,
                    final_loss=0.7, loss_curve=[1.0], iters=1, lr=0.01, train_s=1.0, val_s=1.0,
                    wall_s=2.0, cpu_s=100.0 * (job['norm'].get('window') or 1))

    monkeypatch.setattr(jobs_module, 'run_one', fake_run_one)
    monkeypatch.setattr(sbd, 'ensure_data', lambda root, setting: root)
    argv = ['--windows', '8', '--seeds', '0', '1', '--workers', '1', '--out-dir',
            str(tmp_path / 'runs'), '--doc', str(tmp_path / 'page.md'), '--json',
            str(tmp_path / 'sweep.json')]
    args = ws.parse_args(argv)
    ws.train(ws.plan(args), args.out_dir, tmp_path / 'work', 0)
    assert trained == [('gn', 1, None, 0), ('cbn', 1, 8, 0), ('gn', 1, None, 1),
                       ('cbn', 1, 8, 1)]
    block, records = ws.render(ws.collect(args.out_dir))
    assert '| 1 | CBN, k = 8 | 8 | 0, 1 | 0.505 ± 0.007 (0.500 / 0.510) |' in block
    assert {(r['row'], r['seed'], r['cpu_s']) for r in records} == {
        ('gn', 0, 100.0), ('gn', 1, 100.0), ('cbn', 0, 800.0), ('cbn', 1, 800.0)}
    trained.clear()
    assert ws.main(argv + ['--render-only']) == 0 and trained == []
    assert ws.main(argv) == 0 and trained == []  # every folder holds its finished run


def test_finished_runs_are_reused_and_failed_ones_are_not(tmp_path):
    _result(tmp_path, 'cbn_b1_L8_s0', 0.6, 500)
    _result(tmp_path, 'cbn_b1_L8_s1', 0.0, 10, status='error at step 3')
    args = ws.parse_args(['--no-gn', '--windows', '8', '--seeds', '0', '1'])
    done = [ws.finished(tmp_path, r) is not None for r in ws.plan(args)]
    assert done == [True, False]


def test_table_groups_seeds_by_batch_and_window(tmp_path):
    _result(tmp_path, 'gn_b1_L4_s0', 0.56, 300)
    _result(tmp_path, 'cbn_b1_L32_s1', 0.60, 1400)
    _result(tmp_path, 'cbn_b1_L32_s0', 0.62, 1500)
    _result(tmp_path, 'cbn_b1_L4_s0', 0.55, 550)
    _result(tmp_path, 'cbn_b2_L32_s0', 0.58, 700)
    (tmp_path / 'unrelated').mkdir()
    block, records = ws.render(ws.collect(tmp_path))
    lines = [line for line in block.splitlines() if line.startswith('| ') and 'norm' not in line]
    assert [line.split(' | ')[:4] for line in lines] == [
        ['| 1', 'GN', '-', '0'], ['| 1', 'CBN, k = 4', '4', '0'],
        ['| 1', 'CBN, k = 32', '32', '0, 1'], ['| 2', 'CBN, k = 16', '32', '0']]
    assert '0.610 ± 0.014 (0.620 / 0.600)' in lines[2] and lines[2].endswith('| 1450 |')
    assert len(records) == 5 and {r['window'] for r in records} == {None, 4, 32, 16}


def test_render_only_writes_the_block_and_json(tmp_path):
    _result(tmp_path / 'runs', 'cbn_b1_L16_s0', 0.59, 600)
    doc, out = tmp_path / 'page.md', tmp_path / 'sweep.json'
    doc.write_text('# Page\n\nprose\n')
    assert ws.main(['--windows', '16', '--seeds', '0', '--no-gn', '--render-only',
                    '--out-dir', str(tmp_path / 'runs'), '--doc', str(doc),
                    '--json', str(out)]) == 0
    text = doc.read_text()
    assert text.startswith('# Page\n\nprose\n') and ws.DOC_BEGIN in text
    assert '| 1 | CBN, k = 16 | 16 | 0 | 0.590 |' in text
    assert json.loads(out.read_text())['runs'][0]['mAP'] == 0.59


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(SystemExit):
        ws.parse_args(['--windows', '0'])
    with pytest.raises(SystemExit):
        ws.parse_args(['--workers', '0'])


@pytest.mark.parametrize('groups', [1, 2])
def test_window_memory_formula_is_what_a_layer_holds(groups):
    """--memory's count per layer equals the numbers a layer's window holds once recorded."""
    import torch
    from torch import nn

    import cbn_plugin
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=groups, bias=False),
                          cbn_plugin.CBN(6, window_size=5))
    cbn_plugin.bind(model, logger=None)
    model(torch.randn(2, 4, 5, 5)).sum().backward()
    cbn_plugin.step(model)
    assert ws.window_numel(model[1], 5) == model[1].window_numel() > 0
    assert ws.window_numel(model[1], 9) == 2 * model[1].window_numel()
