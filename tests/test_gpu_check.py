"""The GPU check (tools/analysis_tools/gpu_check.py) on the CPU: every part runs end to end
at tiny sizes with the OpenMMLab packages unimportable (as on the GPU machine) and is
reported, a part that raises is recorded and the others still run,
the verdicts follow the figures (a ratio on the wrong side of its goal fails), and a run
with no budget left still writes its report."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'tools' / 'analysis_tools' / 'gpu_check.py'
WITHOUT = ROOT / 'tests' / 'without_openmmlab.py'
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402

# Smaller than --smoke: a test's budget. The compile rows with dynamo alone.
TINY = ['--device', 'cpu', '--smoke', '--steps', '4', '--window', '2', '--oracle-steps', '2',
        '--layer-repeats', '1', '--stack-repeats', '2', '--fpn-sizes', '8x12', '--no-peak',
        '--compile-norms', 'BN', 'CBN in FPN + head', '--compile-modes', 'default',
        '--compile-backend', 'eager', '--compile-steps', '3', '--compile-repeats', '1']


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu') / 'gpu.md'
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(WITHOUT), str(SCRIPT), *TINY, '--out', str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f'smoke run: {time.perf_counter() - start:.1f} s')
    return out, json.loads(out.with_suffix('.json').read_text())


def test_every_part_runs_and_is_reported(smoke):
    out, results = smoke
    assert list(results['parts']) == list(gpu_check.PARTS)
    assert {n: p['status'] for n, p in results['parts'].items()} == dict.fromkeys(
        gpu_check.PARTS, 'ok')
    page = out.read_text()
    assert page.startswith('# CBN on a GPU') and 'No GPU has run this check yet' in page
    for name in gpu_check.PARTS:
        assert f'\n## {name}\n' in page
    assert results['machine']['device'] == 'cpu' and results['machine']['torch']
    parts = {n: p['result'] for n, p in results['parts'].items()}
    assert len(parts['oracles']) == len(gpu_check.ORACLE_RUNS)
    assert parts['train']['steps'] == 4 and parts['train']['syncs'] is None
    assert parts['train']['host_reads'] == 0  # no host read in a step, as on CUDA
    assert parts['train']['window_clocks'] == [4]
    assert parts['state_dict']['round_trip']
    variants = gpu_check.layer_variants()
    assert len(parts['layers']) == 2 * len(variants)  # one FPN size and the box head
    assert [r['norm'] for r in parts['stack']] == list(gpu_check.STACK_ROWS)
    assert [(r['norm'], r['mode']) for r in parts['compile']] == [
        ('BN', 'default'), ('CBN in FPN + head', 'default')]
    for row in parts['compile']:  # the compiled stack trains as its eager twin
        assert 1 <= row['graphs'] <= 2 and row['graph_breaks'] == 0, row
        assert row['loss_vs_eager_max_rel'] < 1e-5, row


def test_the_verdicts_follow_the_figures(smoke):
    """Each verdict is recomputed here from the rows the json holds."""
    out, results = smoke
    verdicts = {v['goal']: v for v in results['verdicts']}
    assert len(verdicts) == 6
    rows = {r['norm']: r for r in results['parts']['stack']['result']}
    bn = rows['BN']['wall_fastest_ms']
    for name, goal in (('CBN in FPN + head', gpu_check.GOAL_TIME_FPN_HEAD),
                       ('CBN everywhere', gpu_check.GOAL_TIME_ALL)):
        ratio = rows[name]['wall_fastest_ms'] / bn
        verdict = next(v for g, v in verdicts.items() if 'step time' in g and name in g)
        assert verdict['measured'] == f'{ratio:.3f}x'
        assert verdict['met'] == (ratio <= goal)
    memory = next(v for g, v in verdicts.items() if 'peak memory' in g)
    assert memory['met'] is None  # --no-peak, and k = 2 is not the goal's k = 8
    syncs = next(v for g, v in verdicts.items() if 'syncs' in g)
    assert syncs['met'] is (results['parts']['train']['result']['host_reads'] == 0)
    assert 'CPU stand-in' in syncs['measured']
    crashes = next(v for g, v in verdicts.items() if 'crashes' in g)
    assert crashes['met'] is True
    for v in results['verdicts']:
        mark = 'not measured' if v['met'] is None else 'PASS' if v['met'] else 'FAIL'
        assert f'- {mark}: {v["goal"]}: {v["measured"]}' in out.read_text()


def test_host_reads_counts_what_would_sync_on_cuda():
    """The CPU's stand-in for the sync debug mode sees a host read and host data."""
    import torch
    x = torch.ones(3)

    def step(i):
        y = (x * i).sum()
        if float(y) > 100:  # a host read
            raise AssertionError
        return y + torch.tensor([1.0])  # host data: a blocking copy on CUDA
    losses = []
    reads = gpu_check.host_reads(step, range(2), None, losses)
    assert len(losses) == 2
    assert reads['host_read_ops'] == {'aten._local_scalar_dense': 2, 'aten.lift_fresh': 2}
    assert reads['host_reads'] == 4


def synthetic(ratios: dict, peak: float, syncs, window: int = 8) -> dict:
    rows = [dict(norm='BN', wall_fastest_ms=100.0, peak_mib=1000.0)]
    rows += [dict(norm=n, wall_fastest_ms=100.0 * r, peak_mib=1000.0 * peak)
             for n, r in ratios.items()]
    for row in rows:
        row['wall_vs_bn'] = row['wall_fastest_ms'] / 100.0
        row['peak_vs_bn'] = row['peak_mib'] / 1000.0
    return dict(settings=dict(window=window), parts=dict(
        train=dict(status='ok', result=dict(syncs=syncs, steps_checked=10, first_sync=None)),
        stack=dict(status='ok', result=rows)))


@pytest.mark.parametrize('fpn_head, everywhere, peak, syncs, expect', [
    (1.10, 1.5, 1.15, 0, [True, True, True, True, True]),
    (1.11, 1.5, 1.15, 0, [True, True, False, True, True]),
    (1.05, 1.51, 1.16, 1, [True, False, True, False, False]),
])
def test_verdict_thresholds(fpn_head, everywhere, peak, syncs, expect):
    results = synthetic({'CBN in FPN + head': fpn_head, 'CBN everywhere': everywhere}, peak,
                        syncs)
    got = [v['met'] for v in gpu_check.verdicts(results)]
    # crashes, syncs, amp (not run: None), time FPN + head, time everywhere, memory
    assert got[2] is None
    assert [got[0], got[1], got[3], got[4], got[5]] == expect


def test_memory_verdict_needs_the_goals_window():
    results = synthetic({'CBN in FPN + head': 1.0, 'CBN everywhere': 1.0}, 1.0, 0, window=4)
    memory = gpu_check.verdicts(results)[-1]
    assert memory['met'] is None and 'k = 4' in memory['measured']


def test_a_failing_part_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    def planted(args, device):
        raise RuntimeError('planted failure')
    monkeypatch.setattr(gpu_check, 'state_dict_part', planted)
    out = tmp_path / 'gpu.md'
    code = gpu_check.main([*TINY, '--parts', 'oracles', 'state_dict', '--out', str(out)])
    assert code == 1
    results = json.loads(out.with_suffix('.json').read_text())
    failed = results['parts']['state_dict']
    assert failed['status'] == 'failed' and failed['error'] == 'RuntimeError: planted failure'
    assert 'planted' in failed['traceback'] and 'in planted' in failed['traceback']
    assert results['parts']['oracles']['status'] == 'ok'
    assert results['parts']['train'] == dict(status='skipped',
                                             reason='not asked for (--parts)')
    page = out.read_text()
    assert '### state_dict failed' in page
    assert '- FAIL: 0 crashes (every part and compile row ran without raising): 1 failed: ' \
           'state_dict' in page


def test_no_budget_left_still_writes_the_report(tmp_path):
    out = tmp_path / 'gpu.md'
    assert gpu_check.main([*TINY, '--budget-s', '0', '--out', str(out)]) == 0
    results = json.loads(out.with_suffix('.json').read_text())
    assert {p['status'] for p in results['parts'].values()} == {'skipped'}
    assert all(v['met'] in (None, True) for v in results['verdicts'])
    page = out.read_text()
    out.write_text('')
    assert gpu_check.main(['--from-json', '--out', str(out)]) == 0  # measures nothing
    assert out.read_text() == page and gpu_check.GPU_COMMAND in page


@pytest.mark.parametrize('wrapped', [False, True], ids=['plain', 'wrapped'])
def test_a_compile_row_past_the_budget_is_stopped_and_recorded(monkeypatch, wrapped):
    """The deadline stops a compile row running past the budget; the rows after it are
    skipped, and a stop is no crash, also when the stop arrives wrapped in another error
    (dynamo wraps what a signal handler raises inside a compile in its own).

    The row is a stand-in that never ends: a real compile's length depends on the machine
    and on what earlier tests compiled in this process (a warm cache finished it within
    the budget once), and this tests the deadline, not the compiler."""
    import torch
    import torch._dynamo  # noqa: F401  (compile_part imports it: before the clock starts)

    def never_ends(*_):
        try:
            while True:
                time.sleep(0.01)
        except TimeoutError as exc:
            if wrapped:
                raise RuntimeError('an error of the compiler around the stop') from exc
            raise
    monkeypatch.setattr(gpu_check, 'compile_row', never_ends)
    args = gpu_check.parse([*TINY, '--budget-s', '1', '--compile-grace-s', '0',
                            '--compile-reserve-s', '0',
                            '--compile-norms', 'BN', 'CBN in FPN + head'])
    rows = gpu_check.compile_part(args, torch.device('cpu'), time.perf_counter())
    assert rows[0]['error'].startswith('TimeoutError: stopped after'), rows[0]
    assert rows[1]['skipped'].startswith('time budget'), rows[1]
    results = dict(settings=dict(window=2), parts=dict(compile=dict(status='ok', result=rows)))
    assert gpu_check.verdicts(results)[0]['met'] is True
