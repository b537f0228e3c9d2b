"""tools/analysis_tools/small_batch_detection.py: configs, jobs, and a --tiny run end to end.

The --tiny run goes through the tool's own main() (in this process, ``--workers 0``) on a
tiny digits set and checks what it writes: the json, the md block, the plot, and that
each run trained with the batch, steps, learning rate and norm its row says.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'analysis_tools' / 'small_batch_detection.py'


@pytest.fixture(scope='module')
def sbd():
    spec = importlib.util.spec_from_file_location('small_batch_detection', TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules['small_batch_detection'] = module
    spec.loader.exec_module(module)
    return module


def _setting(sbd, **kw):
    args = sbd.parse_args(['--tiny'] + [x for k, v in kw.items()
                                        for x in (f'--{k.replace("_", "-")}', str(v))])
    return sbd.setting_from_args(args)


def _norm_types(model):
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    return [type(m).__name__ for m in model.modules() if isinstance(m, (_BatchNorm, nn.GroupNorm))]


@pytest.mark.parametrize('row, expected', [('bn', {'BatchNorm2d'}), ('gn', {'GroupNorm'}),
                                           ('naive-cbn', {'CrossIterationBatchNorm2d'})])
def test_every_norm_layer_is_the_studied_one(sbd, tmp_path, row, expected):
    import cbn_plugin  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    setting = _setting(sbd, width=8)
    job = sbd.make_job(row, setting, 0, tmp_path, tmp_path)
    model = MODELS.build(sbd.build_config(job).model)
    types = _norm_types(model)
    # stem (1) + 8 basic blocks x 2 + 3 downsample shortcuts, 8 FPN convs, 4 box-head convs
    assert len(types) == 1 + 16 + 3 + 8 + 4
    assert set(types) == expected
    assert model.backbone.base_channels == 8 and model.neck.out_channels == 16


def test_the_placement_row_keeps_gn_in_the_backbone(sbd, tmp_path):
    import cbn_plugin  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    job = sbd.make_job('cbn-fpn-head', _setting(sbd, width=8), 0, tmp_path, tmp_path)
    assert job['norm'] == dict(kind='cbn', cbn_args={}, window=32, backbone='gn')
    model = MODELS.build(sbd.build_config(job).model)
    assert set(_norm_types(model.backbone)) == {'GroupNorm'}
    assert len(_norm_types(model.backbone)) == 1 + 16 + 3
    # the paper's placement: every FPN conv and box-head conv, nothing else
    assert _norm_types(model.neck) + _norm_types(model.roi_head) == \
        ['CrossIterationBatchNorm2d'] * (8 + 4)
    assert 'cbn-fpn-head' not in sbd.DEFAULT_ROWS


def test_jobs_scale_lr_and_keep_images_seen(sbd, tmp_path):
    setting = _setting(sbd, images=64, large=8, small=2, lr_per_image=0.01)
    jobs = {row: sbd.make_job(row, setting, 0, tmp_path, tmp_path) for row in sbd.ROWS}
    for row, job in jobs.items():
        cfg = sbd.build_config(job)
        per_step = job['batch'] * job['accum']
        assert cfg.train_dataloader.batch_size == job['batch']
        assert cfg.train_cfg.max_iters * job['batch'] == 64, row
        assert cfg.optim_wrapper.optimizer.lr == pytest.approx(0.01 * per_step), row
        assert cfg.optim_wrapper.get('accumulative_counts', 1) == job['accum'], row
        if job['norm']['kind'] == 'cbn':
            # a row without a fixed window gives none: CBNHook derives 32 images' worth
            fixed = sbd.ROWS[row].get('window')
            assert job['norm']['cbn_args'].get('window_size') == fixed, row
            assert job['norm']['window'] == (fixed or max(2, round(32 / per_step))), row
            precise = ['PreciseCBNHook'] if row == 'cbn-precise' else []
            assert [h.type for h in cfg.custom_hooks] == ['CBNHook'] + precise, row
            assert cfg.custom_hooks[0].get('window_images', 32) == 32
        else:
            assert not cfg.get('custom_hooks'), row
    assert jobs['bn-large']['batch'] == 8 and jobs['bn']['batch'] == 2
    assert jobs['bn-accum']['accum'] == 4 and jobs['bn-accum']['batch'] == 1
    assert jobs['cbn-paper']['norm'] == dict(kind='cbn', cbn_args=dict(mode='paper'), window=16)
    assert jobs['cbn']['norm'] == dict(kind='cbn', cbn_args={}, window=16)
    assert jobs['naive-cbn']['norm'] == dict(kind='cbn', cbn_args=dict(rho=0.0), window=16)
    assert jobs['cbn-accum']['norm']['window'] == 8
    # --window fixes every CBN row's window that the row does not fix itself
    fixed = sbd.make_job('cbn', setting, 0, tmp_path, tmp_path, window=5)['norm']
    assert fixed == dict(kind='cbn', cbn_args=dict(window_size=5), window=5)
    assert sbd.make_job('cbn-accum-k2', setting, 0, tmp_path, tmp_path,
                        window=5)['norm']['window'] == 2
    # the precise row trains the 'cbn' row's layers, then recomputes the statistics once,
    # after the last step (before validation), from 200 images; not a default row
    assert jobs['cbn-precise']['norm'] == dict(jobs['cbn']['norm'], precise_batches=200)
    precise = sbd.build_config(jobs['cbn-precise'])
    assert precise.custom_hooks[1] == dict(type='PreciseCBNHook', num_batches=200,
                                           interval=precise.train_cfg.max_iters)
    assert 'cbn-precise' not in sbd.DEFAULT_ROWS and 'cbn' in sbd.DEFAULT_ROWS
    # the two-pass row: its layers take two_pass and its loop runs the statistics pass
    two_pass = sbd.build_config(jobs['cbn-accum-two-pass'])
    assert jobs['cbn-accum-two-pass']['norm']['cbn_args'] == dict(accumulation='two_pass',
                                                                  window_size=8)
    assert two_pass.train_cfg.type == 'TwoPassIterBasedTrainLoop'
    assert {sbd.build_config(jobs[row]).train_cfg.get('type', 'IterBasedTrainLoop')
            for row in jobs if row != 'cbn-accum-two-pass'} == {'IterBasedTrainLoop'}


def test_a_row_that_repeats_another_runs_once(sbd):
    rows = list(sbd.DEFAULT_ROWS)
    assert sbd.distinct_rows(rows, _setting(sbd, large=8, small=1)) == (rows, {})
    kept, repeats = sbd.distinct_rows(rows, _setting(sbd, large=4, small=1))
    assert repeats == {'bn-4': 'bn-large'} and kept == [r for r in rows if r != 'bn-4']
    kept, repeats = sbd.distinct_rows(rows, _setting(sbd, large=8, small=4))
    assert repeats == {'bn-4': 'bn'}
    # a fixed window: the same run as the default row where the derived window is the
    # same (1 x 4 accumulated: 32 images are 8 steps), whatever the large batch
    for large in (4, 32):
        assert sbd.distinct_rows(['cbn-accum', 'cbn-accum-k8'], _setting(sbd, large=large)
                                 )[1] == {'cbn-accum-k8': 'cbn-accum'}
    assert sbd.distinct_rows(['cbn-accum', 'cbn-accum-k4'], _setting(sbd))[1] == {}
    assert sbd.distinct_rows(['cbn-accum', 'cbn-accum-k4'], _setting(sbd), window=4)[1] == \
        {'cbn-accum-k4': 'cbn-accum'}


def test_summary_mean_and_spread(sbd):
    def res(row, seed, m, m50):
        return dict(job=dict(row=row, label=row, batch=1, accum=1, norm=dict(kind='bn'),
                             seed=seed), mAP=m, mAP50=m50, wall_s=10.0 + seed, final_loss=1.0,
                    lr=0.01, iters=5, status='ok')
    rows = sbd.summarise([res('a', 0, 0.5, 0.8), res('a', 1, 0.6, 0.9),
                          res('b', 0, float('nan'), float('nan'))], ['a', 'b'])
    assert rows[0]['mAP'] == pytest.approx(0.55) and rows[0]['mAP_spread'] == pytest.approx(0.1)
    assert rows[0]['mAP50'] == pytest.approx(0.85) and rows[0]['wall_s'] == pytest.approx(10.5)
    assert rows[1]['finished'] == 0 and 'fails' in sbd.summary_table(rows)


def test_goals_are_checked_on_the_table(sbd):
    def res(row, seed, m, batch=1, accum=1):
        return dict(job=dict(row=row, label=sbd.ROWS[row]['label'], batch=batch, accum=accum,
                             norm=dict(kind='bn'), seed=seed), mAP=m, mAP50=m, wall_s=1.0,
                    final_loss=1.0, lr=0.01, iters=5, status='ok')

    def check(cbn, gn, accum):
        results = [res('bn-large', 0, 0.50, 4), res('bn-large', 1, 0.52, 4), res('cbn', 0, cbn),
                   res('gn', 0, gn), res('bn', 0, 0.40), res('cbn-accum', 0, accum, 1, 4),
                   res('cbn-accum', 1, accum + 0.005, 1, 4)]
        rows = ['bn-large', 'cbn', 'gn', 'bn', 'cbn-accum']
        return sbd.goals(sbd.summarise(results, rows), _setting(sbd, large=4, small=1))

    first, second = check(cbn=0.505, gn=0.50, accum=0.50)
    assert '-0.5 against BN, large batch' in first and first.endswith(': met.')
    assert 'minus BN at 4 images' in second and second.endswith(': met.')
    assert check(cbn=0.495, gn=0.48, accum=0.50)[0].endswith(
        'not met (more than 1 point under BN, large batch).')
    assert check(cbn=0.52, gn=0.53, accum=0.50)[0].endswith('not met (not ahead of GN).')
    assert check(cbn=0.52, gn=0.50, accum=0.47)[1].endswith('not met.')   # 4 points off


def _check_run(result, job):
    assert result['status'] == 'ok', result['status']
    assert 0.0 <= result['mAP'] <= 1.0 and 0.0 <= result['mAP50'] <= 1.0
    assert result['mAP50'] >= result['mAP']
    assert math.isfinite(result['final_loss']) and result['loss_curve']
    assert result['wall_s'] >= result['train_s'] > 0 and result['val_s'] > 0
    # the code that trained it: this checkout's commit (the tests run in the repository)
    head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                          text=True, cwd=Path(__file__).parent).stdout.strip()
    assert result['code']['commit'] == (head or 'unknown (not a git checkout)')


def test_tiny_comparison_end_to_end(sbd, tmp_path):
    rows = list(sbd.DEFAULT_ROWS)
    out = tmp_path / 'docs'
    sbd.main(['--tiny', '--workers', '0', '--out-dir', str(out), '--data-root',
              str(tmp_path / 'data'), '--work-dir', str(tmp_path / 'work'), '--rows', *rows])
    run = json.loads((out / sbd.RESULTS_JSON).read_text())
    # --tiny's large batch is 4: 'BN, 4 images' would repeat 'BN, large batch'
    kept, repeats = sbd.distinct_rows(rows, run['setting'])
    assert repeats == ({'bn-4': 'bn-large'} if 'bn-4' in rows else {})
    assert run['rows'] == kept and [r['job']['row'] for r in run['results']] == kept
    for r in run['results']:
        job = r['job']
        _check_run(r, job)
        assert r['iters'] == run['setting']['images'] // job['batch']
        if job['norm']['kind'] == 'cbn':
            # all 32 norm layers are CBN, counted every optimizer step (not every
            # micro-batch), pool the derived window (32 images), and hold every step
            # they could at the end (the tiny run is shorter than the window)
            k, steps = job['norm']['window'], r['iters'] // job['accum']
            assert k == max(2, round(32 / job['images_per_step']))
            assert r['cbn'] == dict(layers=32, steps=[steps], window=[min(k, steps + 1)],
                                    window_size=[k])
        else:
            assert r['cbn'] is None
    doc = (out / sbd.DOC).read_text()
    block = doc.split(sbd.DOC_BEGIN)[1].split(sbd.DOC_END)[0]
    for row in kept:
        assert f'| {sbd.ROWS[row]["label"]} |' in block
    assert run['command'] in block and sbd.PLOT in block
    assert (out / sbd.PLOT).stat().st_size > 1000
    # re-rendering from the json gives the same block
    (out / sbd.DOC).write_text('# title\n')
    sbd.main(['--from-json', '--out-dir', str(out)])
    assert block in (out / sbd.DOC).read_text()


def test_step_cost_times_each_row_pooling_its_window(sbd, tmp_path):
    """--step-cost: every row's model of the study, its CBN layers holding the row's full
    window while timed; per image = per step / images per step; GN is the unit."""
    out = tmp_path / 'docs'
    rows = ['gn', 'cbn', 'cbn-fpn-head', 'cbn-accum']
    sbd.main(['--tiny', '--step-cost', '--width', '8', '--step-repeats', '2', '--step-steps',
              '1', '--out-dir', str(out), '--data-root', str(tmp_path / 'data'), '--rows', *rows])
    run = json.loads((out / sbd.STEP_COST_JSON).read_text())
    by = {r['row']: r for r in run['results']}
    assert list(by) == rows
    assert by['gn']['held'] == [] and by['gn']['vs_gn_per_image'] == 1.0
    assert by['cbn']['held'] == [32] and by['cbn-fpn-head']['held'] == [32]
    assert by['cbn-accum']['held'] == [8] and by['cbn-accum']['images_per_step'] == 4
    assert by['gn']['s_per_image_burn_in'] is None
    for r in by.values():
        assert len(r['s_per_step_all']) == 2 and r['s_per_step'] > 0
        assert r['s_per_image_pooling'] == pytest.approx(r['s_per_step'] / r['images_per_step'])
        # over a run: burn-in (10 % of the steps) at its own cost, the rest pooling
        burn = r['s_per_image_burn_in']
        assert r['s_per_image'] == pytest.approx(
            r['s_per_image_pooling'] if burn is None else 0.9 * r['s_per_image_pooling']
            + 0.1 * burn)
        assert (burn is None) == (r['row'] == 'gn')
        assert r['held_burn_in'] == (None if burn is None else [])  # it recorded nothing
        assert r['vs_gn_per_image'] == pytest.approx(r['s_per_image']
                                                     / by['gn']['s_per_image'])
    doc = (out / sbd.DOC).read_text()
    block = doc.split(sbd.STEP_COST_BEGIN)[1].split(sbd.STEP_COST_END)[0]
    assert '| CBN (new defaults), 1 x 4 accumulated | 1 x 4 | 8 | 8 |' in block
    (out / sbd.DOC).write_text('# title\n')
    sbd.main(['--from-json', '--out-dir', str(out)])
    assert block in (out / sbd.DOC).read_text()


def test_tiny_probe_appends_and_replaces(sbd, tmp_path):
    out = tmp_path / 'docs'
    common = ['--tiny', '--probe', '--workers', '0', '--out-dir', str(out), '--data-root',
              str(tmp_path / 'data'), '--work-dir', str(tmp_path / 'work')]
    sbd.main(common)
    saved = json.loads((out / sbd.PROBES_JSON).read_text())
    assert sorted(p['batch'] for p in saved['probes']) == [2, 4]
    # each probe entry is its run: the metrics and loss its job wrote, at its batch
    runs = {r['job']['batch']: r for r in (json.loads(f.read_text())
                                           for f in (tmp_path / 'work').rglob('result.json'))}
    assert sorted(runs) == [2, 4]
    for p in saved['probes']:
        run = runs[p['batch']]
        assert p['status'] == 'ok' and p['wall_s'] > 0
        for key in ('mAP', 'mAP50', 'final_loss', 'iters', 'lr'):
            assert p[key] == run[key], key
        assert p['iters'] == p['setting']['images'] // p['batch']
        assert p['lr'] == pytest.approx(p['setting']['lr_per_image'] * p['batch'])
    sbd.main(common + ['--width', '4'])        # another setting: appended
    sbd.main(common)                           # the same setting again: replaced
    saved = json.loads((out / sbd.PROBES_JSON).read_text())
    assert len(saved['probes']) == 4
    assert sorted({p['setting']['width'] for p in saved['probes']}) == [4, 8]
    block = (out / sbd.DOC).read_text().split(sbd.PROBE_BEGIN)[1].split(sbd.PROBE_END)[0]
    assert block.count('64px w8 ') == 2 and block.count('64px w4 ') == 2


def test_config_file_swaps_every_norm_to_bn(sbd):
    from mmengine.config import Config
    cfg = Config.fromfile(str(sbd.CONFIG))
    bn = dict(type='BN', requires_grad=True)
    # the base's backbone GN (num_groups=8) must not merge into the BN dict
    assert cfg.model.backbone.norm_cfg == bn
    assert cfg.model.neck.norm_cfg == bn and cfg.model.roi_head.bbox_head.norm_cfg == bn


def test_reuse_takes_identical_jobs_from_the_results_json(sbd, tmp_path, monkeypatch):
    """--reuse without the work dirs (a fresh clone): the committed json's runs of
    identical jobs are kept, and a job that differs (another window) is trained."""
    out, work = tmp_path / 'docs', tmp_path / 'work'
    common = ['--tiny', '--workers', '0', '--out-dir', str(out), '--data-root',
              str(tmp_path / 'data'), '--work-dir', str(work)]
    sbd.main(common + ['--rows', 'bn', 'cbn'])
    first = json.loads((out / sbd.RESULTS_JSON).read_text())['results']
    for saved in work.rglob('result.json'):  # as on a fresh clone: no finished work dirs
        saved.unlink()
    jobs_module = sys.modules[sbd.run_jobs.__module__]
    trained = []
    real = jobs_module.run_one
    monkeypatch.setattr(jobs_module, 'run_one', lambda job, *a: trained.append(job['row'])
                        or real(job, *a))
    sbd.main(common + ['--rows', 'bn', 'cbn', '--reuse'])
    reused = json.loads((out / sbd.RESULTS_JSON).read_text())['results']
    where = str(out / sbd.RESULTS_JSON)
    assert trained == [] and [dict(r, reused_from=where) for r in first] == reused
    assert '0 trained by it; reused, as finished earlier: 2 from ' in (out / sbd.DOC).read_text()
    sbd.main(common + ['--rows', 'bn', 'cbn', '--reuse', '--window', '3'])
    again = json.loads((out / sbd.RESULTS_JSON).read_text())['results']
    assert trained == ['cbn'] and again[0] == reused[0]  # still says where it came from
    assert again[1]['job']['norm']['cbn_args'] == dict(window_size=3)
    assert 'reused_from' not in again[1]
    assert '1 trained by it; reused, as finished earlier: 1 from ' in (out / sbd.DOC).read_text()


# ----------------------------------------------------------------------------- converged


def test_converged_plans_every_budget_with_its_own_schedule(sbd, tmp_path):
    """--converged: one job per budget, seed and row, started budget by budget as given;
    each budget's warm-up, lr steps and burn-in are the same fractions of its iterations,
    and each budget has its own work dirs."""
    args = sbd.parse_args(['--converged'])
    assert args.budgets == sbd.BUDGETS and args.rows == sbd.CONVERGED_ROWS
    assert args.seeds == [0, 1]
    with pytest.raises(SystemExit):  # several budgets are the converged mode's only
        sbd.parse_args(['--images', '2400', '6000'])
    args = sbd.parse_args(['--converged', '--images', '6000', '2400', '--rows', 'gn', 'cbn',
                           'bn-large', '--seeds', '0', '1'])
    setting = sbd.setting_from_args(args)
    jobs = sbd.plan(setting, args.budgets, args.rows, args.seeds, tmp_path, tmp_path / 'w')
    assert [(j['setting']['images'], j['seed'], j['row']) for j in jobs] == [
        (images, seed, row) for images in (6000, 2400) for seed in (0, 1)
        for row in ('gn', 'cbn', 'bn-large')]
    assert len({j['work_dir'] for j in jobs}) == len(jobs)
    # the question's rows first, at every budget; then the others
    assert args.first == ['gn', 'cbn']
    firsts = sbd.plan(setting, args.budgets, args.rows, args.seeds, tmp_path, tmp_path / 'w',
                      first=args.first)
    assert [(j['setting']['images'], j['seed'], j['row']) for j in firsts] == [
        (images, seed, row) for images in (6000, 2400) for seed in (0, 1)
        for row in ('gn', 'cbn')] + [(images, seed, 'bn-large') for images in (6000, 2400)
                                     for seed in (0, 1)]
    for j in jobs:
        images, cfg = j['setting']['images'], sbd.build_config(j)
        assert j['setting'] == dict(setting, images=images)
        iters = images // j['batch']
        assert cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == iters
        warmup, steps = cfg.param_scheduler
        assert warmup.end == round(0.05 * iters)
        assert steps.milestones == [int(0.8 * iters), int(0.93 * iters)]
        assert cfg.optim_wrapper.optimizer.lr == pytest.approx(0.01 * j['batch'])
        if j['row'] == 'cbn':
            assert cfg.custom_hooks[0].burn_in_iters == round(0.1 * iters)
    by = {(j['row'], j['setting']['images']): sbd.build_config(j).train_cfg.max_iters
          for j in jobs}
    assert by[('gn', 6000)] == 6000 and by[('bn-large', 6000)] == 1500
    assert by[('cbn', 2400)] == 2400 and by[('bn-large', 2400)] == 600
    # the cheaper CBN row: the defaults at a fixed window of 8 steps, at 1 image
    k8 = sbd.make_job('cbn-k8', setting, 0, tmp_path, tmp_path)
    assert (k8['batch'], k8['norm']) == (1, dict(kind='cbn', cbn_args=dict(window_size=8),
                                                 window=8))


def _fake_result(job, mAP=None, cpu=None):
    images = job['setting']['images']
    return dict(job=job, status='ok', mAP=mAP if mAP is not None else 0.4 + images / 1000,
                mAP50=0.9, mAP75=0.5, final_loss=0.7, loss_curve=[1.0], iters=images,
                lr=0.01, train_s=1.0, val_s=1.0, wall_s=2.0,
                cpu_s=cpu if cpu is not None else 10.0 * images)


def test_converged_reuses_identical_jobs_and_resumes(sbd, tmp_path, monkeypatch):
    """The converged mode reuses the comparison's runs of identical jobs (its json, no work
    dirs), writes its json after every run, and an interrupted study resumes from it."""
    out, work = tmp_path / 'docs', tmp_path / 'work'
    common = ['--tiny', '--workers', '0', '--out-dir', str(out), '--data-root',
              str(tmp_path / 'data'), '--work-dir', str(work), '--rows', 'gn', 'bn']
    jobs_module = sys.modules[sbd.run_jobs.__module__]
    trained, fail_at = [], []

    def fake_run_one(job, *args):
        if (job['row'], job['setting']['images']) in fail_at:
            raise KeyboardInterrupt  # the study killed in this run
        trained.append((job['row'], job['setting']['images']))
        return _fake_result(job)

    monkeypatch.setattr(jobs_module, 'run_one', fake_run_one)
    monkeypatch.setattr(sbd, 'ensure_data', lambda root, setting: root)  # no run reads it
    sbd.main(common)  # the comparison at the tiny budget, 8 images
    for saved in work.rglob('result.json'):  # a fresh clone: only the committed json
        saved.unlink()
    trained.clear()
    sbd.main(common + ['--converged', '--images', '8', '16', '--reuse'])
    assert trained == [('gn', 16), ('bn', 16)]
    run = json.loads((out / sbd.CONVERGED_JSON).read_text())
    # in the order they start: GN (a --first row) at every budget, then BN
    assert [(r['job']['row'], r['job']['setting']['images']) for r in run['results']] == [
        ('gn', 8), ('gn', 16), ('bn', 8), ('bn', 16)]
    assert [r.get('reused_from') for r in run['results']] == [
        str(out / sbd.RESULTS_JSON), None, str(out / sbd.RESULTS_JSON), None]
    # a longer budget, killed in its second run: the json keeps the first
    trained.clear()
    fail_at.append(('bn', 32))
    with pytest.raises(KeyboardInterrupt):
        sbd.main(common + ['--converged', '--images', '8', '16', '32', '--reuse'])
    assert trained == [('gn', 32)]
    run = json.loads((out / sbd.CONVERGED_JSON).read_text())
    assert len(run['results']) == 5 and len(run['jobs']) == 6
    sbd.main(['--from-json', '--out-dir', str(out)])  # what has run and what is queued
    block = (out / sbd.DOC).read_text().split(sbd.CONVERGED_BEGIN)[1].split(
        sbd.CONVERGED_END)[0]
    assert '5 of the 6 planned runs finished' in block
    assert '- 32 images: BN seed 0' in block
    for saved in work.rglob('result.json'):  # resumes from the json alone
        saved.unlink()
    trained.clear()
    fail_at.clear()
    sbd.main(common + ['--converged', '--images', '8', '16', '32', '--reuse'])
    assert trained == [('bn', 32)]
    block = (out / sbd.DOC).read_text().split(sbd.CONVERGED_BEGIN)[1]
    assert 'Every planned run has finished.' in block
    assert (out / sbd.CONVERGED_PLOT).stat().st_size > 1000


def _converged_run(sbd, points, budgets=(2400, 6000, 15000), queued_rows=()):
    """A converged json from ``points``: row -> [(images, [(mAP, CPU) per seed]), ...]."""
    setting = sbd.setting_from_args(sbd.parse_args([]))
    results, jobs = [], []
    for row, per_budget in points.items():
        for images, seeds in per_budget:
            for seed, (mAP, cpu) in enumerate(seeds):
                job = sbd.make_job(row, dict(setting, images=images), seed, Path('d'), Path('w'),
                                   group='converged')
                jobs.append(job)
                results.append(_fake_result(job, mAP, cpu))
    for row, images, seed in queued_rows:
        jobs.append(sbd.make_job(row, dict(setting, images=images), seed, Path('d'), Path('w'),
                                 group='converged'))
    return dict(command='python tools/analysis_tools/small_batch_detection.py --converged',
                when='2026-12-07 14:00', machine='x86_64, 2 CPUs', load_start='1', load_end='1',
                workers=1, wall_s=60.0, setting=setting, budgets=list(budgets),
                rows=list(points) + [r for r, _, _ in queued_rows if r not in points],
                seeds=[0, 1], jobs=jobs, results=results)


def test_cpu_to_reach_interpolates_between_budgets(sbd):  # sbd: puts the package on the path
    import small_batch_det.converged as conv
    reference = [dict(cpu_s=100.0, mAP=0.5), dict(cpu_s=300.0, mAP=0.7)]
    assert conv.reference_at(reference, 50.0) == (None, 'below')
    assert conv.reference_at(reference, 200.0) == (pytest.approx(0.6), 'interpolated')
    assert conv.reference_at(reference, 900.0) == (0.7, 'at least')
    curve = [dict(images=2400, cpu_s=600.0, mAP=0.59), dict(images=6000, cpu_s=1500.0, mAP=0.72),
             dict(images=15000, cpu_s=3500.0, mAP=0.78)]
    assert conv.cpu_to_reach(curve, 0.75) == (pytest.approx(2500.0), 'interpolated')
    assert conv.cpu_to_reach(curve, 0.72) == (1500.0, 'interpolated')  # reached exactly
    assert conv.cpu_to_reach(curve, 0.50) == (600.0, 'at most')
    assert conv.cpu_to_reach(curve, 0.80) == (None, 'not reached')
    # the first crossing counts, not a later one after a dip
    dip = [dict(images=1, cpu_s=100.0, mAP=0.5), dict(images=2, cpu_s=200.0, mAP=0.7),
           dict(images=3, cpu_s=300.0, mAP=0.6), dict(images=4, cpu_s=400.0, mAP=0.8)]
    assert conv.cpu_to_reach(dip, 0.6) == (pytest.approx(150.0), 'interpolated')


def test_compute_table_from_a_results_json(sbd, tmp_path):
    """GN's best mean over its budgets is the target; each row's CPU to reach it comes off
    its curve through its budgets; a row that never reaches it says so."""
    run = _converged_run(sbd, {
        'bn-large': [(2400, [(0.76, 200.0), (0.76, 200.0)])],
        'bn': [(2400, [(0.40, 260.0)]), (6000, [(0.50, 650.0)]), (15000, [(0.60, 1600.0)])],
        'gn': [(2400, [(0.56, 260.0), (0.56, 260.0)]), (6000, [(0.70, 650.0), (0.70, 650.0)]),
               (15000, [(0.74, 1500.0), (0.76, 1700.0)])],
        'cbn': [(2400, [(0.59, 600.0)]), (6000, [(0.72, 1500.0)]), (15000, [(0.78, 3500.0)])]},
        queued_rows=[('cbn', 15000, 1), ('cbn-k8', 6000, 0)])
    table, best = sbd.compute_table(run)
    assert best == pytest.approx(0.75)
    lines = {line.split(' | ')[0][2:]: line for line in table.splitlines()[2:]}
    assert lines['CBN (new defaults)'] == ('| CBN (new defaults) | 2,400, 6,000, 15,000 | 0.780 '
                                           '(15,000 images, 3,500 s) | 2,500 s | 1.56x |')
    assert lines['GN'].endswith('| 1,600 s | 1.00x |')
    assert lines['BN'].endswith('| not reached | - |')
    assert lines['BN, large batch'].endswith('| at most 200 s | 0.12x |')
    # GN's best, not its longest budget: a GN that drops at 15,000 images sets 0.72
    dropped = _converged_run(sbd, {'gn': [(2400, [(0.56, 260.0)]), (6000, [(0.72, 650.0)]),
                                          (15000, [(0.70, 1600.0)])]})
    assert sbd.compute_table(dropped)[1] == pytest.approx(0.72)
    block = sbd.render_converged(run)
    assert "CPU per run to reach GN's best, 0.750" in block
    # at equal images: each row against GN at the same budget
    assert '| 6,000 | CBN (new defaults) | 1 | 32 | 6000 | 0.720 (1,500 s) | 0.720 | - | +2.0 |' \
        in block
    assert ('| 15,000 | GN | 1 | - | 15000 | 0.740 (1,500 s), 0.760 (1,700 s) | 0.750 | 0.020 '
            '| - | 0.700 | 1,600 s |') in block  # the training loss beside the mAP
    assert '- 15,000 images: CBN (new defaults) seed 1' in block
    assert '- 6,000 images: CBN (new defaults), k=8 seed 0' in block
    # at the step costs measured side by side: a run's CPU is its images times its row's
    # CPU per image (GN 0.1 s: its best, 0.75, at 15,000 images is 1,500 s; CBN 0.2 s
    # reaches 0.75 halfway from 6,000 to 15,000 images: 10,500 x 0.2 s)
    cost = dict(command='step-cost', results=[dict(row='gn', s_per_image=0.1),
                                              dict(row='cbn', s_per_image=0.2)])
    block = sbd.render_converged(run, cost)
    second = block.split('at the step costs measured side by side')[1]
    assert '| CBN (new defaults) | 2,400, 6,000, 15,000 | 0.780 (15,000 images, 3,000 s) | ' \
        '2,100 s | 1.40x |' in second
    assert '| GN | 2,400, 6,000, 15,000 | 0.750 (15,000 images, 1,500 s) | 1,500 s | 1.00x |' \
        in second
    assert 'BN, large batch' not in second  # not measured: left out
    # at equal compute: CBN's 2,400-image run (480 s) against GN's curve at 480 s, between
    # GN's 2,400 (240 s, 0.56) and 6,000 images (600 s, 0.70); its 15,000 (3,000 s) is past
    # GN's longest budget (1,500 s): GN's 0.75 there is a bound
    assert ('| CBN (new defaults) | 2,400: 0.590 at 480 s, GN 0.653 (-6.3); 6,000: 0.720 at '
            '1,200 s, GN 0.733 (-1.3); 15,000: 0.780 at 3,000 s, GN at least 0.750 (+3.0) |'
            ) in second
    assert 'side by side' not in sbd.render_converged(run)
    sbd.plot_converged(run, tmp_path / 'c.png')
    assert (tmp_path / 'c.png').stat().st_size > 1000


def test_runs_from_two_machines_are_marked_and_compared(sbd):
    """A run from a second machine carries its label beside its CPU; a rerun of a job on it
    says whether the floats agree and how the CPU seconds compare, and is not a seed."""
    run = _converged_run(sbd, {'gn': [(2400, [(0.56, 260.0), (0.57, 250.0)])],
                               'cbn': [(2400, [(0.59, 600.0)])]})
    assert 'Machines' not in sbd.render_converged(run)  # one machine: nothing to say
    run['machines'] = {'A': 'the first', 'B': 'a later session'}
    run['results'][1]['machine'] = 'B'
    again = dict(run['results'][0], machine='B', cpu_s=208.0)
    run['reruns'] = [again]
    block = sbd.render_converged(run)
    assert '| 2,400 | GN | 1 | - | 2400 | 0.560 (260 s), 0.570 (250 s, B) | 0.565 |' in block
    assert '0.590 (600 s) |' in block
    assert ('- The same job on A and B: GN, 2,400 images, seed 0: mAP 0.560 and 0.560, final '
            'training loss 0.700000 and 0.700000 (the same floats); CPU 260 s and 208 s '
            '(0.80x on B).') in block
    run['reruns'] = [dict(again, final_loss=0.7001)]
    assert '(not the same floats)' in sbd.render_converged(run)
