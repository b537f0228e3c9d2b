"""The study's markdown: the comparison and probe tables and the generated blocks of
``docs/small_batch_detection.md`` (written with ``study_markdown``, shared with the
classification study)."""
from __future__ import annotations

import math

from detection_runner import by_setting, header
from study_markdown import md_table

from .goals import goals, stats, summarise
from .rows import setting_name

PROBES_JSON = 'small_batch_detection_probes.json'
RESULTS_JSON = 'small_batch_detection.json'
DOC = 'small_batch_detection.md'
PLOT = 'small_batch_detection.png'
TITLE = 'Small-batch detection: BN, GN and CBN in every norm layer of a Faster R-CNN'
PROBE_BEGIN = ('<!-- small-batch-det-probes:begin (written by '
               'tools/analysis_tools/small_batch_detection.py --probe; do not edit) -->')
PROBE_END = '<!-- small-batch-det-probes:end -->'
DOC_BEGIN = ('<!-- small-batch-det:begin (written by '
             'tools/analysis_tools/small_batch_detection.py; do not edit) -->')
DOC_END = '<!-- small-batch-det:end -->'


def fmt(x, digits=3):
    return f'{x:.{digits}f}' if isinstance(x, (int, float)) and math.isfinite(x) else 'fails'


def mean_mAP(s: dict) -> str:
    """A row's mean mAP, and how many of its seeds failed (``summarise``'s row)."""
    failed = '' if s['finished'] == s['seeds'] else f' ({s["seeds"] - s["finished"]} failed)'
    return fmt(s['mAP']) + failed


def summary_table(summary: list[dict]) -> str:
    head = ('row', 'images x steps', 'k', 'lr', 'mAP', 'spread', 'mAP50', 'spread',
            'final loss', 'wall per run', 'CPU per run')
    rows = []
    for s in summary:
        rows.append((s['label'], f'{s["batch"]} x {s["accum"]}' if s['accum'] > 1
                     else str(s['batch']), s['window'] or '-', f'{s["lr"]:.4g}', mean_mAP(s),
                     fmt(s['mAP_spread']), fmt(s['mAP50']), fmt(s['mAP50_spread']),
                     fmt(s['final_loss']), f'{s["wall_s"]:.0f} s', _secs(s['cpu_s'])))
    return md_table(head, rows)


def render(run: dict) -> str:
    s = run['setting']
    summary = summarise(run['results'], run['rows'])
    checks = goals(summary, s)
    return '\n'.join([
        *header(run, setting_name(s), f'mAP and mAP50: COCO box AP on the {s["num_val"]} val '
                'canvases (unseen digits); spread: max - min over seeds; wall per run: process '
                'start to val metrics, mean over seeds; CPU per run: that process\'s CPU time '
                '(one thread: the wall time on an idle core).'),
        '',
        summary_table(summary),
        '',
        *(checks + [''] if checks else []),
        f'![mAP per row]({PLOT})',
        '',
    ])


def probe_table(probes: list[dict]) -> str:
    """One line per setting: BN mAP / mAP50 / wall at each batch, and the drop."""
    rows = []
    for s, runs in by_setting(probes):
        by_batch = {}
        for r in runs:
            by_batch.setdefault(r['batch'], []).append(r)
        large = stats([r['mAP'] for r in by_batch.get(s['large'], [])])[0]  # nan: not run
        for b in sorted(by_batch, reverse=True):
            rs = by_batch[b]
            mAP = stats([r['mAP'] for r in rs])[0]
            if len(rs) > 1:  # every seed's value after the mean
                mAP_text = fmt(mAP) + ' (' + ', '.join(fmt(r['mAP']) for r in rs) + ')'
            else:
                mAP_text = fmt(mAP)
            drop = (large - mAP) * 100 if b != s['large'] else float('nan')
            rows.append((f'{setting_name(s)}, large {s["large"]}', b, rs[0]['iters'],
                         f'{s["lr_per_image"] * b:.4g}', len(rs),
                         mAP_text, fmt(stats([r['mAP50'] for r in rs])[0]),
                         fmt(drop, 1) if b != s['large'] else '-',
                         f'{stats([r["wall_s"] for r in rs])[0]:.0f} s',
                         _secs(stats([r.get('cpu_s', float('nan')) for r in rs])[0]),
                         ' / '.join(str(r.get('load_end', '?')).split()[0] for r in rs),
                         '; '.join(sorted({r['status'] for r in rs}))))
    return md_table(('setting', 'BN batch', 'steps', 'lr', 'seeds', 'mAP', 'mAP50',
                     'drop vs large (mAP points)', 'wall per run', 'CPU per run',
                     'load at end', 'status'), rows)


def _secs(x) -> str:
    return f'{x:.0f} s' if math.isfinite(x) else 'n/a'


def render_probes(saved: dict) -> str:
    return '\n'.join(['', f'Every BN-only probe run so far (`{PROBES_JSON}`; one line per '
                      'setting and batch, mean over the seeds run; wall per run: process '
                      'start to val metrics, one torch thread, machine load in the json):', '',
                      probe_table(saved['probes']), ''])
