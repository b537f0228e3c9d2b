"""The study's figure: mAP and mAP50 per row (seeds as dots) and the training loss."""
from __future__ import annotations

import math
from pathlib import Path

from .goals import summarise
from .report import fmt


def plot(run: dict, path: Path) -> None:
    st = run['setting']
    plot_rows(summarise(run['results'], run['rows']), run['results'],
              f'Faster R-CNN from scratch, every norm layer swapped, digits '
              f'{st["size"]} px, {st["images"]} images seen', path)


def plot_rows(summary: list[dict], results: list[dict], title: str, path: Path) -> None:
    """mAP and mAP50 per row of ``summary`` (bars: means, dots: seeds) beside the training
    loss of each row's runs in ``results`` (mean over seeds); the pretrained-backbone
    study draws its figure with it too."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_map, ax_loss) = plt.subplots(1, 2, figsize=(max(13.0, 6.5 + 0.9 * len(summary)), 5.5),
                                          gridspec_kw=dict(width_ratios=(1.4, 1)))
    x = list(range(len(summary)))
    for dx, key in ((-0.2, 'mAP'), (0.2, 'mAP50')):
        ax_map.bar([i + dx for i in x], [s[key] if math.isfinite(s[key]) else 0 for s in summary],
                   0.4, label=key)
        for i, s in enumerate(summary):
            seeds = [p[key] for p in s['per_seed'] if math.isfinite(p[key])]
            ax_map.plot([i + dx] * len(seeds), seeds, 'k.', markersize=4)
            ax_map.annotate(fmt(s[key]), (i + dx, s[key] if math.isfinite(s[key]) else 0),
                            ha='center', va='bottom', fontsize=7, xytext=(0, 3),
                            textcoords='offset points')
    ax_map.set_xticks(x, [s['label'] for s in summary], fontsize=7, rotation=30, ha='right',
                      rotation_mode='anchor')
    ax_map.set_ylabel('COCO box AP on val (dots: seeds)')
    ax_map.set_ylim(0, 1.1)
    ax_map.legend(loc='upper right', ncol=2, fontsize=8)
    for s in summary:
        curves = [r['loss_curve'] for r in results
                  if r['job']['row'] == s['row'] and r['loss_curve']]
        if curves:
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            ax_loss.plot([(i + 0.5) / n for i in range(n)], mean, label=s['label'], linewidth=1)
    ax_loss.set_xlabel('fraction of training (images seen)')
    ax_loss.set_ylabel('training loss (mean over seeds)')
    ax_loss.set_yscale('log')
    ax_loss.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
