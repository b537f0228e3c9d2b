"""The numbers the study reports: each row's mean and spread over seeds, and the goals
checked on them."""
from __future__ import annotations

import math

from .rows import ROWS, distinct_rows


def stats(values):
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return float('nan'), float('nan'), 0
    return sum(vals) / len(vals), max(vals) - min(vals), len(vals)


def summarise(results: list[dict], rows: list[str]) -> list[dict]:
    """Per row: mean and spread (max - min over seeds) of mAP and mAP50, per-seed values,
    mean CPU and wall time (the pretrained-backbone study tables its rows with it too)."""
    out = []
    for row in rows:
        rs = sorted((r for r in results if r['job']['row'] == row),
                    key=lambda r: r['job']['seed'])
        if not rs:
            continue
        j = rs[0]['job']
        mAP, mAP_spread, n = stats([r['mAP'] for r in rs])
        mAP50, mAP50_spread, _ = stats([r['mAP50'] for r in rs])
        wall, _, _ = stats([r['wall_s'] for r in rs])
        cpu, _, _ = stats([r.get('cpu_s', float('nan')) for r in rs])
        loss, _, _ = stats([r['final_loss'] for r in rs])
        out.append(dict(row=row, label=j['label'], batch=j['batch'], accum=j['accum'],
                        # results from before the derived window name it in cbn_args only
                        window=j['norm'].get('window',
                                             j['norm'].get('cbn_args', {}).get('window_size')),
                        lr=rs[0]['lr'], iters=rs[0]['iters'], seeds=len(rs), finished=n,
                        mAP=mAP, mAP_spread=mAP_spread, mAP50=mAP50, mAP50_spread=mAP50_spread,
                        final_loss=loss, wall_s=wall, cpu_s=cpu,
                        per_seed=[dict(seed=r['job']['seed'], mAP=r['mAP'], mAP50=r['mAP50'],
                                       cpu_s=r.get('cpu_s', float('nan')), wall_s=r['wall_s'],
                                       status=r['status'], machine=r.get('machine'))
                                  for r in rs]))
    return out


def goals(summary: list[dict], setting: dict) -> list[str]:
    """The comparison's goals, checked on the table: CBN with the defaults at the small batch
    within 1 mAP point of BN at the large batch and ahead of GN and of BN at the same
    batch; CBN 1 x 4 accumulated equal to BN at 4 images within the seed spread."""
    by = {x['row']: x for x in summary if math.isfinite(x['mAP'])}
    out = []
    if 'cbn' in by:
        cbn = by['cbn']
        parts = [f'{(cbn["mAP"] - by[row]["mAP"]) * 100:+.1f} against {by[row]["label"]}'
                 for row in ('bn-large', 'bn-2', 'gn', 'bn') if row in by]
        missed = [f'more than 1 point under {by["bn-large"]["label"]}'] \
            if 'bn-large' in by and cbn['mAP'] < by['bn-large']['mAP'] - 0.01 else []
        missed += [f'not ahead of {by[row]["label"]}' for row in ('gn', 'bn')
                   if row in by and cbn['mAP'] <= by[row]['mAP']]
        out.append(f'- CBN (new defaults) at {cbn["batch"]} image(s) per step, mAP points: '
                   + ', '.join(parts) + '. Goal (within 1 point of BN at the large batch, '
                   f'ahead of GN and of BN at the same batch): '
                   + ('met.' if not missed else f'not met ({"; ".join(missed)}).'))
    # BN at 4 images; in a setting where that is another row's run, that row
    target = distinct_rows(list(ROWS), setting)[1].get('bn-4', 'bn-4')
    if 'cbn-accum' in by and target in by:
        a, t = by['cbn-accum'], by[target]
        spread = max(a['mAP_spread'], t['mAP_spread'])
        gap = a['mAP'] - t['mAP']
        bn = by.get('bn-accum')
        out.append(f'- CBN 1 x 4 accumulated minus BN at 4 images: {gap * 100:+.1f} mAP '
                   f'points, the larger seed spread of the two {spread * 100:.1f}'
                   + (f' (BN 1 x 4 accumulated: {(bn["mAP"] - t["mAP"]) * 100:+.1f})'
                      if bn else '') + '. Goal (equal within the seed spread): '
                   f'{"met" if abs(gap) <= spread else "not met"}.')
    return out
