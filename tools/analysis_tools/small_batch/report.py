"""The markdown of the study: tables from the runs' results, the generated blocks of
``docs/small_batch.md`` and ``docs/small_batch_precise.md``."""
from __future__ import annotations

import numpy as np
from study_markdown import md_table

from .grid import LARGEST_BATCH, NORMS, PAPER, PLAIN, display, is_cbn, lr_for, spec_for, window_for
from .models import LAYER_DEFAULTS
from .probe import FIDELITY

DOC_BEGIN = ('<!-- small-batch:begin (written by tools/analysis_tools/small_batch_study.py; '
             'do not edit) -->')
DOC_END = '<!-- small-batch:end -->'


def _fmt(values, digits=3):
    vals = [v for v in values if v == v]
    if not vals:
        return 'fails'
    if len(vals) == 1:
        return f'{vals[0]:.{digits}f}'
    suffix = '' if len(vals) == len(values) else f' ({len(values) - len(vals)} failed)'
    return f'{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}{suffix}'


def _select(results, **kw):
    out = []
    for r in results:
        c = r['cfg']
        if all((c.get(k) if k != 'window' else c['norm'].get('window')) == v
               for k, v in kw.items()):
            out.append(r)
    return out


STATS = (('window', 'acc_window'), ('batch', 'acc'))


def accuracy_rows(results, group, labels, batches, window_stats=False):
    """``[(row label, [cell per batch])]`` with accuracy mean ± std over seeds."""
    rows = []
    for label in labels:
        for stats, field in (STATS if window_stats else STATS[1:]):
            if not is_cbn(label) and stats == 'window':
                continue
            cells = []
            for b in batches:
                rs = _select(results, group=group, label=label, batch=b)
                cells.append(_fmt([r[field] for r in rs]) if rs else '')
            name = display(label) if not is_cbn(label) or not window_stats else \
                f'{display(label)}, running stats from {stats}'
            rows.append((name, cells))
    return rows


def named_table(header, rows):
    """A table of ``(row name, [cells])`` rows, the form the functions here build."""
    return md_table(header, [(name, *cells) for name, cells in rows])


def _analysis_mean(rs, key, layer=None):
    vals = []
    for r in rs:
        for name, m in r.get('analysis', {}).items():
            if (layer is None or name == layer) and key in m:
                vals.append(m[key])
    return float(np.nanmean(vals)) if vals else float('nan')


def _acc(results, group, label, batch, field='acc', **kw):
    vals = [r[field] for r in _select(results, group=group, label=label, batch=batch, **kw)]
    vals = [v for v in vals if v == v]
    return (float(np.mean(vals)), float(np.min(vals))) if vals else (float('nan'),) * 2


def _pts(d):
    return f'{100 * d:+.1f}' if d == d else '-'


def goal_rows(results, args, group, labels, batches, sweep=True):
    """The goal of the defaults, per CBN row and running-statistics source.

    Points (accuracy x 100) against the bar: batch 2 and 1 minus BN at batch 32 (goal:
    >= -0.5) and minus GN at the same batch (goal: > 0), the worst gap to BN at the same
    batch over every batch < 32 (and 32 for ``CBN()``, whose k is 4 there; goal: >= 0), and
    in the learning-rate sweep (seed 0) the
    worst gap at batch 2 and 1 to BN at batch 32 and to GN, over the learning rates where
    BN at batch 32 trains (test accuracy >= ``args.trains``).
    """
    rows = []
    bn32 = _acc(results, group, 'BN', LARGEST_BATCH)[0]
    small = [b for b in (2, 1) if b in batches]
    lrs = []
    if sweep:
        for base in args.sweep_base_lrs:
            ref = _acc(results, 'lrsweep', 'BN', LARGEST_BATCH, base_lr=base)[0]
            if ref == ref and ref >= args.trains:
                lrs.append((base, ref))
    def lrs_done(label):
        return any(_select(results, group='lrsweep', label=label, base_lr=base, batch=b)
                   for base, _ in lrs if base != args.base_lr for b in small)

    for label in labels:
        if not is_cbn(label):
            continue
        for stats, field in STATS:
            cells, ok = [], True
            for b in small:
                d = _acc(results, group, label, b, field)[0] - bn32
                ok &= d >= -0.005
                cells.append(_pts(d))
            for b in small:
                d = _acc(results, group, label, b, field)[0] - _acc(results, group, 'GN', b)[0]
                ok &= d > 0
                cells.append(_pts(d))
            same = [_acc(results, group, label, b, field)[0] - _acc(results, group, 'BN', b)[0]
                    for b in batches if b < LARGEST_BATCH or NORMS[label].get('plain')]
            worst = min(same) if same else float('nan')
            ok &= worst >= 0
            ok_main = ok
            cells.append(_pts(worst))
            if sweep:
                gaps, gn_gaps = [], []
                for base, ref in lrs:
                    for b in small:
                        acc = _acc(results, 'lrsweep', label, b, field, base_lr=base)[0]
                        gaps.append(acc - ref)
                        gn_gaps.append(acc - _acc(results, 'lrsweep', 'GN', b, base_lr=base)[0])
                w, wg = (min(gaps), min(gn_gaps)) if gaps else (float('nan'),) * 2
                ok &= w >= -0.005 and wg > 0
                cells += [_pts(w), _pts(wg)]
            if sweep and not lrs_done(label):
                cells.append(('yes' if ok_main else 'no') + ' (main grid; not in the sweep)')
            else:
                cells.append('**yes**' if ok else 'no')
            rows.append((f'{display(label)}, from {stats}', cells))
    header = ['CBN row, running stats'] + [f'b{b} - BN b32' for b in small] + [
        f'b{b} - GN b{b}' for b in small] + ['worst vs BN same batch']
    if sweep:
        header += ['lr sweep: worst b2/b1 - BN b32', 'lr sweep: worst b2/b1 - GN']
    header.append('goal met')
    return header, rows, lrs


def lr_table(results, args):
    """Accuracy in the learning-rate sweep (seed 0): BN at 32, 2, 1, GN and CBN at 2, 1."""
    sweep = [r for r in results if r['cfg']['group'] == 'lrsweep']
    if not sweep:
        return ''
    rows = []
    for label in args.lr_norms:
        for b in args.lr_batches:
            if b == LARGEST_BATCH and is_cbn(label):
                continue
            cells = []
            for base in args.sweep_base_lrs:
                rs = _select(sweep, label=label, batch=b, base_lr=base)
                n = f' ({len(rs)} seeds)' if len(rs) > 1 else ''
                if not rs:
                    cells.append('')
                elif is_cbn(label):
                    cells.append(f'{_fmt([r["acc_window"] for r in rs])} / '
                                 f'{_fmt([r["acc"] for r in rs])}{n}')
                else:
                    cells.append(_fmt([r['acc'] for r in rs]) + n)
            if not any(cells):
                continue
            k = f', k={spec_for(label, b)["window"]}' if is_cbn(label) else ''
            rows.append((f'{display(label)}, batch {b}{k}', cells))
    header = ['norm, batch'] + [f'base lr {base:g} (lr at batch 2: {lr_for(2, base):g})'
                                for base in args.sweep_base_lrs]
    return named_table(header, rows)


ESTIMATES = (('current', 'current batch alone (BN)'), ('naive', 'naive pooling (rho=0)'),
             ('munu', 'CBN, (mu, nu) compensation (the paper\'s; what these runs used)'),
             ('varform', 'CBN, var compensation'))


def error_tables(results, group, label, batches):
    """Per batch and layer: errors vs the true window and vs the population."""
    lines = []
    rows = []
    for b in batches:
        rs = [r for r in _select(results, group=group, label=label, batch=b) if 'analysis' in r]
        if not rs:
            continue
        for layer in sorted({n for r in rs for n in r['analysis']}):
            cells = []
            for key, _ in ESTIMATES:
                cells.append(f'{_analysis_mean(rs, f"win_mean_err_{key}", layer):.3f} / '
                             f'{_analysis_mean(rs, f"win_std_err_{key}", layer):.3f}')
            cells.append(f'{_analysis_mean(rs, "pop_mean_err_truth", layer):.3f} / '
                         f'{_analysis_mean(rs, "pop_std_err_truth", layer):.3f}')
            for key in ('current', 'cbn'):
                cells.append(f'{_analysis_mean(rs, f"pop_mean_err_{key}", layer):.3f} / '
                             f'{_analysis_mean(rs, f"pop_std_err_{key}", layer):.3f}')
            rows.append((f'{b} (k={window_for(b)}) {layer}', cells))
    if rows:
        header = ['batch (window) layer'] + [n for _, n in ESTIMATES] + [
            'true window vs population', 'current vs population', 'CBN vs population']
        lines.append(named_table(header, rows))
    return '\n'.join(lines)


def _dmu2_share(g):
    """d_mu^2 over the (mu, nu) form's net under-estimate, from run-averaged metrics.

    The (mu, nu) bias is the var-form bias minus d_mu^2, so the net under-estimate is
    d_mu^2 - (var-form bias); a share above 1 means the var-form over-estimates on net.
    """
    dmu2, under = g('entry_dmu2'), g('entry_dmu2') - g('entry_var_bias_varform')
    return dmu2 / under if under > 0 else float('nan')


def _fixed_cell(g):
    """Share of the (mu,nu) form's negative entries that the var form does not have.

    The var form's entries are the (mu,nu) form's plus d_mu^2 >= 0, so its negatives are
    a subset: 1 - neg_varform / neg_(mu,nu), from the run-averaged fractions.
    """
    neg = g('neg_frac_comp')
    return f'{100 * (1 - g("neg_frac_varform") / neg):.0f}' if neg > 0 else '-'


def entry_table(results, group, label, batches):
    rows = []
    for b in batches:
        rs = [r for r in _select(results, group=group, label=label, batch=b) if 'analysis' in r]
        if not rs or 'entry_dmu2' not in next(iter(rs[0]['analysis'].values())):
            continue
        for layer in sorted({n for r in rs for n in r['analysis']}):
            g = lambda k: _analysis_mean(rs, k, layer)  # noqa: E731
            rows.append((f'{b} (k={window_for(b)}) {layer}', [
                f'{g("entry_mean_err_naive"):.3f} / {g("entry_mean_err_comp"):.3f}',
                f'{g("entry_var_bias_naive"):+.3f} / {g("entry_var_bias_comp"):+.3f} / '
                f'{g("entry_var_bias_varform"):+.3f}',
                f'{g("entry_var_abs_naive"):.3f} / {g("entry_var_abs_comp"):.3f} / '
                f'{g("entry_var_abs_varform"):.3f}',
                f'{g("entry_dmu2"):.3f}', f'{_dmu2_share(g):.2f}',
                f'{100 * g("neg_frac_comp"):.1f} / {100 * g("neg_frac_varform"):.1f}',
                _fixed_cell(g)]))
    if not rows:
        return ''
    header = ['batch (window) layer', 'mean err: stored / compensated',
              'var bias: stored / (mu,nu) / var-form', 'var abs err: stored / (mu,nu) / var-form',
              'd_mu^2', 'd_mu^2 share of (mu,nu) under-estimate',
              '% negative: (mu,nu) / var-form', '% of negatives fixed by var-form']
    return named_table(header, rows)


def sweep_tables(results, args):
    rows_acc, rows_err = [], []
    sweep = [r for r in results if r['cfg']['group'] == 'sweep']
    if not sweep:
        return '', ''
    b = args.sweep_batch
    header_acc = ['norm', 'k'] + [f'lr {lr_for(b, base):g}' for base in args.sweep_base_lrs]
    rows_acc.append(('BN', ['1'] + [_fmt([r['acc'] for r in _select(
        results, group='lrsweep', label='BN', batch=b, base_lr=base)])
        for base in args.sweep_base_lrs]))
    for label in args.sweep_norms:
        for k in args.sweep_windows:
            if not _select(sweep, label=label, window=k):
                continue
            cells = [str(k)]
            for base in args.sweep_base_lrs:
                rs = _select(sweep, label=label, base_lr=base, window=k)
                cells.append(' / '.join(_fmt([r[f]]) for r in rs for f in ('acc_window', 'acc'))
                             + (f' (loss {rs[0]["final_loss"]:.2f})' if rs else ''))
            rows_acc.append((display(label), cells))
    header_err = ['run', 'k', 'lr', 'mean err: current / naive / (mu,nu) / var',
                  'std err: current / naive / (mu,nu) / var', '% negative (mu,nu) / var',
                  'd_mu^2 share of (mu,nu) under-estimate', 'cos(grad W, W)', '|W| growth',
                  'gradient cos with large-batch BN: current / pooled / BN at this batch / '
                  'compensated']
    for label in args.sweep_norms:
        for base in args.sweep_base_lrs:
            for k in args.sweep_windows:
                rs = [r for r in _select(sweep, label=label, base_lr=base, window=k)
                      if 'analysis' in r]
                if not rs:
                    continue
                g = lambda key: _analysis_mean(rs, key)  # noqa: E731
                cos = np.mean([np.mean(list(r['radial_cos'].values())) for r in rs])
                growth = np.mean([np.mean([v[-1] / v[0] for v in r['weight_norm'].values()])
                                  for r in rs])
                rows_err.append((display(label), [
                    str(k), f'{lr_for(b, base):g}',
                    ' / '.join(f'{g(f"win_mean_err_{e}"):.3f}' for e, _ in ESTIMATES),
                    ' / '.join(f'{g(f"win_std_err_{e}"):.3f}' for e, _ in ESTIMATES),
                    f'{100 * g("neg_frac_comp"):.1f} / {100 * g("neg_frac_varform"):.1f}',
                    f'{_dmu2_share(g):.2f}', f'{cos:+.3f}', f'{growth:.2f}',
                    _fidelity_cell(rs)]))
    bn_rows = []
    for base in args.sweep_base_lrs:
        rs = [r for r in _select(results, group='lrsweep', label='BN', batch=b, base_lr=base)
              if 'radial_cos' in r]
        if rs:
            cos = np.mean([np.mean(list(r['radial_cos'].values())) for r in rs])
            growth = np.mean([np.mean([v[-1] / v[0] for v in r['weight_norm'].values()])
                              for r in rs])
            bn_rows.append(('BN', ['1', f'{lr_for(b, base):g}', '', '', '', '', f'{cos:+.3f}',
                                   f'{growth:.2f}', '']))
    return named_table(header_acc, rows_acc), named_table(header_err, rows_err + bn_rows)


def _fidelity_cell(rs):
    rs = [r for r in rs if 'grad_fidelity' in r]
    if not rs:
        return ''
    return ' / '.join(f'{np.mean([r["grad_fidelity"].get(f"cos_{m}", np.nan) for r in rs]):.2f}'
                      for m in FIDELITY)


def fidelity_table(results, group, labels, batches):
    """Per CBN variant and batch: gradient cosines with the large-batch BN gradient."""
    rows = []
    for label in labels:
        if not is_cbn(label):
            continue
        cells = [_fidelity_cell(_select(results, group=group, label=label, batch=b))
                 for b in batches if b < LARGEST_BATCH]
        if any(cells):
            rows.append((f'trained with {display(label)}', cells))
    return named_table(['run'] + [f'batch {b} (k={window_for(b)})' for b in batches
                               if b < LARGEST_BATCH], rows)


def radial_table(results, group, labels, batches):
    rows = []
    for label in labels:
        cells = []
        for b in batches:
            rs = [r for r in _select(results, group=group, label=label, batch=b)
                  if 'radial_cos' in r]
            if not rs:
                cells.append('')
                continue
            cos = np.mean([np.mean(list(r['radial_cos'].values())) for r in rs])
            growth = np.mean([np.mean([v[-1] / v[0] for v in r['weight_norm'].values()])
                              for r in rs])
            cells.append(f'{cos:+.3f} ({growth:.2f})')
        rows.append((display(label), cells))
    return named_table(['norm'] + [f'batch {b}' for b in batches], rows)


def running_error_rows(results, group, labels, batches):
    """Per norm (and running-statistics rule): running stats vs the test-time inputs."""
    rows = []
    for label in labels:
        if NORMS[label]['kind'] == 'gn':
            continue
        rules = ('window', 'batch') if is_cbn(label) else ('batch',)
        for rule in rules:
            cells = []
            for b in batches:
                rs = [r['running_error'][rule] for r in _select(results, group=group,
                                                                 label=label, batch=b)
                      if rule in r.get('running_error', {})]
                cells.append(f'{np.mean([e["mean"] for e in rs]):.3f} / '
                             f'{np.mean([e["std"] for e in rs]):.3f}' if rs else '')
            rows.append((display(label) if len(rules) == 1 else f'{display(label)}, from {rule}',
                         cells))
    return rows


def loss_rows(results, group, labels, batches):
    rows = []
    for label in labels:
        rows.append((display(label), [_fmt([r['final_loss'] for r in _select(
            results, group=group, label=label, batch=b)], 2) for b in batches]))
    return rows


def group_tables(results, group, labels, batches) -> list[str]:
    """Markdown lines: a group's accuracy (both running statistics) and final-loss tables."""
    header = ['norm'] + [f'batch {b}' for b in batches]
    return [named_table(header, accuracy_rows(results, group, labels, batches, True)), '',
            'Final training loss:', '',
            named_table(header, loss_rows(results, group, labels, batches)), '']


def failures(results):
    lines = []
    seen = set()
    for r in results:
        if r['status'] != 'ok':
            c = r['cfg']
            key = (c['group'], c['arch'], c['label'], c['batch'], c['lr'], c['seed'])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f'- {c["group"]}/{c["arch"]} {c["label"]} batch {c["batch"]} '
                         f'lr {c["lr"]:g} seed {c["seed"]}: {r["status"]}')
    return '\n'.join(lines)


def checks(results) -> str:
    """The study's self-checks, worst over every run: it measured the layer that trained."""
    def worst(values):
        values = [v for v in values if v == v]
        return f'{max(values):.1e}' if values else '-'
    ema = [r['ema_check'] for r in results if 'ema_check' in r]
    fid = [r['grad_fidelity'] for r in results if 'grad_fidelity' in r]
    ana = [m for r in results for m in r.get('analysis', {}).values() if 'check_mean' in m]
    return (f'Self-checks, worst over all runs: the study\'s copy of each running-statistics '
            f'rule vs the layer\'s own {worst(ema)}; the analysis\'s compensated past entries '
            f'vs `layer.past_entries()` {worst([m["check_mean"] for m in ana])} (mean) / '
            f'{worst([m["check_var"] for m in ana])} (var); the layer copy\'s gradient under '
            f'the run\'s own `stats_backward` vs the training step\'s (relative) '
            f'{worst([f["check"] for f in fid])}, its loss vs the training loss '
            f'{worst([f.get("check_forward", float("nan")) for f in fid])}.')


def headline(results, args) -> list[str]:
    """The numbers the text of docs/small_batch.md refers to, computed from this run."""
    out = []
    small = min(args.batches)
    b2 = 2 if 2 in args.batches else small
    top = max(args.batches)
    if args.raw_batches:
        out.append('raw 8x8, BN: ' + ', '.join(
            f'batch {b} {_acc(results, "raw", "BN", b)[0]:.3f}' for b in args.raw_batches))

    def row(group, label, b):
        if not is_cbn(label):
            return f'{label} {_acc(results, group, label, b)[0]:.3f}'
        return (f'{label} {_acc(results, group, label, b, "acc_window")[0]:.3f} / '
                f'{_acc(results, group, label, b)[0]:.3f}')
    for b in sorted({top, b2, small}, reverse=True):
        out.append(f'4x4, batch {b} (CBN: running stats from window / from batch): ' + ', '.join(
            row('main', label, b) for label in args.norms
            if b < LARGEST_BATCH or not is_cbn(label) or label == PLAIN))
    if any(r['cfg']['group'] == 'resnet' for r in results):
        rb = min(args.resnet_batches)
        out.append(f'ResNet, every norm swapped, batch {rb} (window / batch stats; worst seed): '
                   + ', '.join(
                       row('resnet', label, rb) + (
                           f' (worst {_acc(results, "resnet", label, rb, "acc_window")[1]:.3f}'
                           f' / {_acc(results, "resnet", label, rb)[1]:.3f})'
                           if is_cbn(label) else '')
                       for label in args.resnet_norms))
    if any(r['cfg']['group'] == 'second' for r in results):
        for b in sorted(args.second_batches, reverse=True):
            out.append(f'second setting ({args.second_arch}, {args.second_task}), batch {b}: '
                       + ', '.join(row('second', label, b) for label in args.second_norms))
    for b in sorted({b2, small}, reverse=True):
        rs = [r for r in _select(results, group='main', label=PAPER, batch=b) if 'analysis' in r]
        if not rs:
            continue
        g = lambda k: _analysis_mean(rs, k)  # noqa: E731
        out.append(
            f'statistics error at batch {b} (k={window_for(b)}), runs of the paper\'s layer, '
            f'mean over layers, mean / std error vs the true window: current batch '
            f'{g("win_mean_err_current"):.3f} / {g("win_std_err_current"):.3f}, naive '
            f'{g("win_mean_err_naive"):.3f} / {g("win_std_err_naive"):.3f}, (mu,nu) '
            f'{g("win_mean_err_munu"):.3f} / {g("win_std_err_munu"):.3f}, var '
            f'{g("win_mean_err_varform"):.3f} / {g("win_std_err_varform"):.3f}; past entries '
            f'with negative variance {100 * g("neg_frac_comp"):.1f} % ((mu,nu) form) vs '
            f'{100 * g("neg_frac_varform"):.1f} % (var form); d_mu^2 share of the (mu,nu) '
            f'under-estimate {_dmu2_share(g):.2f}')
    fid = []
    for b in args.batches:
        rs = [r for r in _select(results, group='main', batch=b) if 'grad_fidelity' in r
              and r['cfg']['norm'].get('rho', 1.0) == 1.0 and not r['cfg']['norm'].get('plain')]
        if rs:
            fid.append(f'batch {b} (k={window_for(b)}) ' + '/'.join(
                f'{np.mean([r["grad_fidelity"].get(f"cos_{m}", np.nan) for r in rs]):.2f}'
                for m in FIDELITY))
    if fid:
        out.append('gradient cosine with the large-batch BN gradient, current / pooled / BN at '
                   'this batch / compensated (all compensating CBN runs): ' + ', '.join(fid))
    if any(r['cfg']['group'] == 'lrsweep' for r in results):
        for b in args.lr_batches:
            out.append(f'lr sweep, batch {b}, window stats for CBN (base lr ' + ', '.join(
                f'{base:g}' for base in args.sweep_base_lrs) + '): ' + '; '.join(
                f'{label} ' + ' '.join(
                    f'{_acc(results, "lrsweep", label, b, "acc_window" if is_cbn(label) else "acc", base_lr=base)[0]:.3f}'  # noqa: E501
                    for base in args.sweep_base_lrs)
                for label in args.lr_norms if _select(results, group='lrsweep', label=label,
                                                      batch=b)))
    return out


def render(results, args, wall, meta) -> str:
    b_hdr = ['norm'] + [f'batch {b}' for b in args.batches]
    header, rows, lrs = goal_rows(results, args, 'main', args.norms, args.batches,
                                  sweep=any(r['cfg']['group'] == 'lrsweep' for r in results))
    parts = [
        f'Generated by `{meta["command"]}` on {meta["when"]} ({meta["machine"]}); '
        f'wall time {wall / 60:.1f} min with {args.workers} worker processes '
        f'(load average at start {meta["load_start"]}, at end {meta["load_end"]}).'
        + (f' {meta["note"]}' if meta.get('note') else ''),
        '',
        f'Setup: {args.samples} training samples seen per run at every batch size; SGD '
        f'momentum 0.9, weight decay 5e-4, cosine decay; lr = {args.base_lr:g} x batch / 32; '
        f'CBN window k = 32 / batch (batch 1: k = 32) except `{PLAIN}` (k = 4 at every '
        f'batch), rho 1, burn-in 0, variance rule clamp; the layer\'s defaults '
        f'(`mode=\'default\'`): stats_backward={LAYER_DEFAULTS["stats_backward"]!r}, '
        f'compensation={LAYER_DEFAULTS["compensation"]!r}, '
        f'running_stats={LAYER_DEFAULTS["running_stats"]!r}; {args.seeds} seeds (mean ± std) for '
        f'{", ".join(args.seed_norms)}, seed 0 for the other rows; '
        f'test set 719 images.',
        '',
        checks(results),
        '',
        '### The goal of the defaults (SmallCNN, 4x4 digits)',
        '',
        'Points (accuracy x 100). BN at batch 32 trains (test accuracy >= '
        f'{args.trains:g}) in the learning-rate sweep at base lr '
        + (', '.join(f'{base:g} ({ref:.3f})' for base, ref in lrs) or 'none') + '. '
        'Goal: batch 2 and 1 >= BN at batch 32 - 0.5 and > GN, there and at every such '
        'learning rate of the sweep (seed 0; at the largest lr BN and the defaults at batch 2 '
        f'and BN at batch 32 with {args.top_lr_seeds} seeds, mean), and >= BN at the same batch '
        'at every batch.',
        '',
        named_table(header, rows),
        '',
        '### Headline numbers',
        '',
        '\n'.join(f'{i + 1}. {line}' for i, line in enumerate(headline(results, args))),
        '',
        '### Raw 8x8 digits (the data before it was made harder): BN at small batch',
        '',
        named_table(['norm'] + [f'batch {b}' for b in args.raw_batches],
                 accuracy_rows(results, 'raw', ['BN'], args.raw_batches)),
        '',
        '### Test accuracy, digits at 4x4 (SmallCNN, every norm swapped)',
        '',
        'At batch 32 every CBN row with k = 32 / batch has k = 1, i.e. is BN (one shared '
        'run).',
        '',
        named_table(b_hdr, accuracy_rows(results, 'main', args.norms, args.batches, True)),
        '',
        'Final training loss (mean of the last 10 % of steps, training-mode forward):',
        '',
        named_table(b_hdr, loss_rows(results, 'main', args.norms, args.batches)),
        '',
        'Inference statistics: how far the final running statistics are from the '
        'statistics each layer actually receives at test time (512 training images through '
        'the eval-mode network), `mean error / std error` as in the analysis below, mean '
        'over the layers:',
        '',
        named_table(b_hdr, running_error_rows(results, 'main', args.norms, args.batches)),
        '',
    ]
    lr_tab = lr_table(results, args)
    if lr_tab:
        parts += [
            '### Learning rate: BN at batch 32 against batch 2 and 1 (seed 0 unless a cell says)',
            '',
            'Linear scaling as in the main grid: the lr at batch b is base lr x b / 32. CBN '
            'cells: `running stats from window / from batch`.',
            '',
            lr_tab,
            '',
        ]
    if any(r['cfg']['group'] == 'resnet' for r in results):
        parts += [
            f'### Every BN of a ResNet replaced (SmallResNet, 9 norm layers, stem included; '
            f'{args.resnet_seeds} seeds)',
            '',
            *group_tables(results, 'resnet', args.resnet_norms, args.resnet_batches),
        ]
    if any(r['cfg']['group'] == 'second' for r in results):
        h2, rows2, _ = goal_rows(results, args, 'second', args.second_norms,
                                 args.second_batches, sweep=False)
        parts += [
            f'### Second setting: {args.second_arch} on `{args.second_task}` digits '
            f'({args.second_seeds} seeds)',
            '',
            *group_tables(results, 'second', args.second_norms, args.second_batches),
            'The goal, in this setting (points):',
            '',
            named_table(h2, rows2),
            '',
        ]
    parts += [
        f'### Statistics error per layer (SmallCNN, runs of the paper\'s layer `{PAPER}`)',
        '',
        'Each cell is `mean error / std error`: the mean error in units of the reference '
        'std (RMS over channels) and |log(sigma_est / sigma_ref)| (RMS over channels), '
        f'averaged over {args.measure} points per run (evenly spread over training once the '
        'window is full) and over seeds. Reference in the first four columns: the true '
        'window statistics (the window\'s raw batches pushed through the current network). '
        'Both compensations are computed from the same stored statistics and derivatives.',
        '',
        error_tables(results, 'main', PAPER, args.batches),
        '',
        '### Past entries: compensation and the d_mu^2 term (same runs)',
        '',
        'Per past (step, channel) entry against its true value under the current network. '
        '"var bias" and "var abs err" are sum(est - true) and sum|est - true| over '
        'sum(true); "(mu,nu)" is the paper\'s compensation '
        '(var_old + <dvar/dW, dW> - d_mu^2, before the clamp), "var-form" is the layer\'s '
        '`compensation=\'var\'` (the same plus d_mu^2). "d_mu^2 share" is '
        'd_mu^2 / (d_mu^2 - var-form bias), the part of the (mu,nu) form\'s net '
        'under-estimate that the d_mu^2 term makes (the rest, the var-form bias, is '
        'dW^T C dW plus everything upstream of the conv that the truncation ignores).',
        '',
        entry_table(results, 'main', PAPER, args.batches),
        '',
    ]
    acc_sweep, err_sweep = sweep_tables(results, args)
    if acc_sweep:
        parts += [
            f'### Window and learning rate (batch {args.sweep_batch}, seed 0, '
            f'{args.samples} samples)',
            '',
            'Test accuracy, `running stats from window / from batch` (final training loss):',
            '',
            acc_sweep,
            '',
            'Statistics error (mean over the 3 layers and the measurement points; columns '
            'as above) and the gradient\'s radial component: mean over convs and channels of '
            'cos(dL/dW_j, W_j), and the growth of the mean per-channel ||W_j|| from the first '
            'to the last measurement:',
            '',
            err_sweep,
            '',
        ]
    parts += [
        '### Which backward is closest to the large-batch gradient? (SmallCNN)',
        '',
        'At the same analysis points, the conv-weight gradient of this batch\'s loss under '
        'each backward, compared (cosine, mean over the convs) with the ideal: the '
        'gradient through BN over the union of this batch and the window\'s old batches '
        '(all under the current weights; large-batch BN, what CBN approximates). Cells: '
        '`current (the paper) / pooled / BN at this batch alone / compensated`. The three '
        'CBN backwards are the layer\'s own: a copy of the network loaded from the '
        'state_dict (window included) with `stats_backward` set, one training forward and '
        'backward; the copy under the run\'s own backward reproduces the training gradient '
        '(self-checks above). Naive CBN\'s past entries do not depend on the weights: no '
        '"compensated" column.',
        '',
        fidelity_table(results, 'main', args.norms, args.batches),
        '',
        '### Gradient radial component in the main grid: cos(dL/dW_j, W_j) (|W| growth)',
        '',
        radial_table(results, 'main', args.norms, args.batches),
        '',
    ]
    fail = failures(results)
    if fail:
        parts += ['### Runs that did not finish', '', fail, '']
    parts += ['![accuracy vs batch](small_batch.png)', '',
              '![statistics error vs window and lr](small_batch_errors.png)']
    return '\n'.join(parts)


PRECISE_BEGIN = ('<!-- small-batch-precise:begin '
                 '(tools/analysis_tools/small_batch_study.py --precise) -->')
PRECISE_END = '<!-- small-batch-precise:end -->'


def render_precise(results, args, wall, meta) -> str:
    lines = [f"Generated by `{meta['command']}` on {meta['when']} ({meta['machine']}); "
             f'wall time {wall / 60:.1f} min (load average at start {meta["load_start"]}).', '',
             f'SmallCNN on 4x4 digits, every norm swapped, {args.samples} training images '
             f'seen, base lr {args.base_lr} (linear scaling), {args.seeds} seeds (mean ± std). '
             'Test accuracy of the same trained weights with three sources of inference '
             'statistics: the running average of the batch statistics (BN\'s rule), of the '
             'pooled window statistics (CBN\'s default), and recomputed after training from '
             f'{args.precise_samples} training images at the training batch size with the '
             'weights fixed (`cbn_plugin.recompute_statistics`: every CBN layer pools k '
             'batches as in training; for BN this is PreciseBN).', '',
             '| norm | batch | from batch | from window | recomputed (precise) |',
             '|---|---|---|---|---|']
    for label in args.precise_norms:
        for b in args.precise_batches:
            rs = [r for r in results if r['cfg']['label'] == label and r['cfg']['batch'] == b]
            if not rs:
                continue
            window = rs[0]['cfg']['norm'].get('window', 1)
            name = display(label) + (f', k={window}' if is_cbn(label) else '')
            lines.append(f"| {name} | {b} | {_fmt([r['acc'] for r in rs])} | "
                         + (f"{_fmt([r['acc_window'] for r in rs])} | " if is_cbn(label)
                            else '- | ')
                         + f"{_fmt([r.get('acc_precise', float('nan')) for r in rs])} |")
    return '\n'.join(lines)
