"""The benchmark's reference implementation of the authors' layer is the same
algorithm as CBN, so the speed comparison in docs/benchmarks.md is like for like."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cbn_plugin
from oracle import sgd_in_lockstep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tools' / 'analysis_tools'))
import benchmark  # noqa: E402


def _pair(norm):
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    return nn.Sequential(conv, norm, nn.ReLU(), nn.Conv2d(6, 2, 1))


@pytest.mark.parametrize('window', [2, 4])
def test_authors_reference_matches_cbn_with_the_exclude_rule(window):
    """In float64 over SGD steps: same outputs, gradients and running statistics as
    ``CBN(variance_rule='exclude')``, whose (mu, var) window the authors keep as
    (mu, nu, dmu/dW, dnu/dW, W)."""
    torch.manual_seed(0)
    ours = _pair(cbn_plugin.CBN(6, window_size=window, variance_rule='exclude', mode='paper')).double()
    ref = _pair(benchmark.AuthorsCBN(6, window_size=window)).double()
    ref.load_state_dict(ours.state_dict(), strict=False)
    cbn_plugin.bind(ours, logger=None)
    benchmark.attach_authors(ref)
    assert ref[1].conv is ref[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(window + 3):
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64) * 3 + 2
        out, out_ref = ours(x), ref(x)
        torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-10)
        target = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (out * target).sum().backward()
        (out_ref * target).sum().backward()
        sgd_in_lockstep(list(ours.parameters()), list(ref.parameters()), 0.05, 1e-8, 1e-10)
        cbn_plugin.step(ours)
    torch.testing.assert_close(ours[1].running_mean, ref[1].running_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours[1].running_var, ref[1].running_var, rtol=1e-9, atol=1e-12)
    # Their window holds 3 |W| per past step (+ 2 C), ours |W| + P + 2C.
    k1, w, c = window - 1, ours[0].weight.numel(), 6
    assert ref[1].window_numel() == k1 * (3 * w + 2 * c)
    assert ours[1].window_numel() == k1 * (w + 27 + 2 * c)


def test_sampled_variants_follow_the_strides_asked_for():
    cfgs = benchmark.norm_configs(window=3, strides=(2, 5))
    made = {name: benchmark.build_norm(cfg, 64) for name, cfg in cfgs.items() if cfg is not None}
    assert made['CBN default sampled s=2'].dvar_stride == 2
    assert made['CBN default sampled s=5'].dvar_stride == 5
    assert made['CBN paper'].dvar_stride == 1 and made['naive CBN'].rho == 0
    assert made['CBN paper'].stats_backward == 'current'
    assert made['CBN default'].stats_backward == 'compensated'
    assert made['CBN default, mu_nu'].compensation == 'mu_nu'


def test_cpu_peak_memory_sees_the_window():
    """The per-variant child process measures what training keeps resident: exact
    CBN's peak exceeds BN's by at least its window (float32 numbers)."""
    import argparse
    args = argparse.Namespace(window=2, image=64, rois_per_image=16, threads=1,
                              dvar_strides=[2], peak_memory=True)
    cpu = torch.device('cpu')
    peaks = {name: benchmark.peak_memory(name, None, args, cpu) for name in ('BN', 'CBN paper')}
    model, step = benchmark.detector_step('CBN paper', args, cpu)
    for _ in range(args.window + 1):
        step()
    window_mib = benchmark.window_numel(model) * 4 / 2 ** 20
    assert window_mib > 10
    assert peaks['CBN paper'] - peaks['BN'] >= window_mib, (peaks, window_mib)


# ---------------------------------------------------------------- host overhead (part 4)
import host_overhead  # noqa: E402


def test_op_counter_counts_a_known_sequence_exactly():
    a, b = torch.ones(3), torch.full((3,), 2.0)

    def sequence():
        c = a.add(b)
        c.mul(b).sum()
        a.add(b)
    assert host_overhead.count_ops(sequence) == {'aten.add': 2, 'aten.mul': 1, 'aten.sum': 1}


def test_op_counter_sees_the_backward_and_the_optimizer():
    """A training step's count includes the ops autograd and SGD dispatch."""
    model, optimizer, inputs = host_overhead.make_tiny(host_overhead.TINY_VARIANTS['BN'], 1,
                                                       torch.device('cpu'))
    step = host_overhead.training_step(model, optimizer, inputs)
    step()  # the first SGD step creates the momentum buffers
    counts = host_overhead.count_ops(step)
    assert counts['aten.convolution_backward'] == 1
    assert counts['aten.native_batch_norm_backward'] == 1
    assert counts['aten.mul_'] >= 1  # the momentum buffer update


def _host_args(**kw):
    import argparse
    args = dict(host_layers=[1, 2], host_repeats=1, host_steps=1, top_ops=5, compile_steps=2,
                compile_backend='eager', sync_timeout=600, threads=1, digits_repeats=1,
                r50_repeats=1, digits_width=8, host_compile=True, host_sync=True,
                host_digits=True, host_r50=False)
    args.update(kw)
    return argparse.Namespace(**args)


@pytest.fixture(scope='module')
def host_record():
    return host_overhead.run(_host_args(), torch.device('cpu'))


def test_host_section_has_a_row_for_every_norm(host_record):
    rows = {r['norm']: r for r in host_record['tiny']}
    assert list(rows) == list(host_overhead.TINY_VARIANTS)
    for row in rows.values():
        assert row['ops_per_layer'] > 0 and row['ops_per_layer'] == int(row['ops_per_layer'])
        assert row['step_peak_kib'] > 0
    # Counts, not clocks: CBN dispatches more than BN, 4 calls more than 1, and the
    # window persists between steps.
    assert rows['CBN default']['ops_per_layer'] > rows['BN']['ops_per_layer']
    accumulated = rows[f'BN, {host_overhead.ACCUMULATION_CALLS}-call accumulation']
    assert accumulated['ops_per_layer'] > rows['BN']['ops_per_layer']
    assert accumulated['baseline'] == accumulated['norm']
    assert rows['CBN default']['persistent_kib'] > rows['BN']['persistent_kib']
    assert dict(host_record['top_ops']['CBN default'])
    # Every op of a CBN layer step has a site: the sites add up to the op count, the
    # layer's conv and SGD ops are outside the plugin, and the pool's are in it.
    sites = dict(host_record['sites'])
    assert sum(sites.values()) == rows['CBN default']['ops_per_layer']
    assert sites[host_overhead.OUTSIDE_THE_PLUGIN] >= 3
    assert sites['functional._CompensatedPool.forward'] > 0
    assert sites['window.CrossIterationWindow.write'] > 0


def test_host_section_compile_sync_and_digits_rows(host_record):
    compiled = {r['norm']: r for r in host_record['compile']['rows']}
    assert list(compiled) == list(host_overhead.COMPILE_VARIANTS)
    for row in compiled.values():
        assert 'error' in row or (row['layers_1']['graphs'] >= 1
                                  and row['explain_graph_breaks'] >= 0)
    assert compiled['BN'].get('error') is None and compiled['BN']['layers_2']['graphs'] == 1
    # The window CBNHook derives at 1 image per step, trained over twice its length: a
    # few graphs and no fall back to eager.
    k32 = compiled['CBN default, k = 32']
    assert k32.get('error') is None and k32['steps'] == 64
    for stack in (k32['layers_1'], k32['layers_2']):
        assert stack['graphs'] <= 4 and stack['recompile_limit_hits'] == 0, stack
    sync = host_record['sync']
    assert 'error' not in sync, sync.get('error')
    assert [r['norm'] for r in sync['rows']] == list(host_overhead.SYNC_VARIANTS)
    assert all(r['ops_per_layer'] > 0 for r in sync['rows'])
    digits = {r['norm']: r for r in host_record['digits']}
    assert list(digits) == list(host_overhead.DIGITS_VARIANTS)
    for row in digits.values():
        assert row['norm_layers'] == 32  # stem, 16 block convs, 3 shortcuts, 8 FPN, 4 head
        assert row['ops_per_step'] > 0
    assert digits['CBN default']['ops_per_step'] > digits['BN']['ops_per_step']


def test_host_report_prints_the_targets_and_every_table(host_record):
    text = '\n'.join(host_overhead.render('test', host_record, None))
    targets = host_overhead.targets(host_record, None)
    # The tiny-stack targets are decided (pass or fail); the R50 one was not run here.
    assert [met is None for _, met, _ in targets[:3]] == [False, False, False]
    assert targets[3][1] is None
    for target, met, measured in targets:
        assert f'{target}: {measured}' in text
    for name in list(host_overhead.TINY_VARIANTS) + list(host_overhead.DIGITS_VARIANTS):
        assert f'| {name} |' in text
    assert 'torch.compile' in text and 'SyncCBN' in text
    assert 'CPU only: no GPU' in text
    # Beside a baseline: the before columns and the memory comparison.
    text = '\n'.join(host_overhead.render('later', host_record, dict(host_record)))
    assert '| before |' in text
    lines = [t for t, _, _ in host_overhead.targets(host_record, dict(host_record))]
    assert any('Peak memory' in t and '(tiny' in t for t in lines)


def test_benchmark_keeps_the_other_parts_of_the_page(tmp_path, host_record):
    """A host run writes its section and keeps parts 1-3 of the page it found."""
    import json
    import shutil
    docs = Path(benchmark.__file__).resolve().parents[2] / 'docs'
    page = tmp_path / 'benchmarks.md'
    shutil.copy(docs / 'benchmarks.json', tmp_path / 'benchmarks.json')
    previous = benchmark.load_previous(page)
    run = dict(command='python tools/analysis_tools/benchmark.py --parts host', date='now',
               machine=benchmark.machine(torch.device('cpu')))
    record = dict(host_record, run=run)
    new = dict(run=run, host={'latest': record})
    benchmark.write_report(benchmark.merge(previous, new, ['host']), page)
    text = page.read_text()
    for part in ('layer', 'detector', 'inference'):
        if part in previous.get('runs', {}):
            assert previous['runs'][part]['command'] in text
    assert '## 4. Host overhead' in text and '### Host overhead: latest' in text
    saved = json.loads((tmp_path / 'benchmarks.json').read_text())
    assert 'latest' in saved['host'] and saved['runs']['host']['command'] == run['command']
    # --from-json: the page again from its json alone.
    benchmark.main(['--from-json', '--out', str(page)])
    assert page.read_text() == text


# ---------------------------------------------------------------- deployment (part 5)
import deploy_inference  # noqa: E402


def test_fold_folds_every_bn_of_the_digits_detector_and_keeps_its_outputs():
    cpu = torch.device('cpu')
    models = deploy_inference.deployed_models(
        lambda cfg: host_overhead.digits_detector(cfg, cpu, width=8),
        dict(type='BN'), dict(type='CBN', window_size=4), dict(type='GN', num_groups=8), cpu)
    assert models['BN folded into the conv'][1] == 32
    assert models['CBN converted to BN (convert_to_bn) and folded'][1] == 32
    assert models[deploy_inference.GN_ROW][1] == 0
    assert deploy_inference.count_norms(models['BN folded into the conv'][0]) == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = models['BN, not folded'][0].extract_feat(x)
        for name in ('BN folded into the conv', 'CBN in eval mode, not converted',
                     'CBN converted to BN (convert_to_bn) and folded'):
            for a, b in zip(ref, models[name][0].extract_feat(x)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_deploy_section_runs_and_reports_the_same_boxes():
    import argparse
    args = argparse.Namespace(digits_width=8, deploy_repeats=1, deploy_r50=False)
    result = deploy_inference.run(args, torch.device('cpu'))
    rows = {r['model']: r for r in result['digits']['rows']}
    assert rows['CBN converted to BN (convert_to_bn) and folded']['same_boxes_as_bn'] is True
    assert rows['BN folded into the conv']['same_boxes_as_bn'] is True
    assert rows[deploy_inference.GN_ROW]['norms_left'] == 32
    text = '\n'.join(deploy_inference.render(result))
    assert 'Deployment gets' in text
