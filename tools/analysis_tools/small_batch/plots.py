"""The study's figures: accuracy vs batch, statistics error vs window and learning rate."""
from __future__ import annotations

import numpy as np

from .grid import NORMS, PAPER, display, is_cbn, lr_for
from .report import _analysis_mean, _select

_PALETTE = ('C0', 'C2', 'C7', 'C3', 'C1', 'C8', 'C9', 'C5', 'C4', 'C6')


def _color(label):
    return _PALETTE[list(NORMS).index(label) % len(_PALETTE)]


def plot_accuracy(results, args, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [('main', 'SmallCNN (3 norm layers), digits at 4x4', args.batches, args.norms)]
    if any(r['cfg']['group'] == 'resnet' for r in results):
        panels.append(('resnet', 'SmallResNet (9 norm layers, all swapped), 4x4',
                       args.resnet_batches, args.resnet_norms))
    if any(r['cfg']['group'] == 'second' for r in results):
        panels.append(('second', f'second setting: {args.second_arch}, {args.second_task}',
                       args.second_batches, args.second_norms))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.0), squeeze=False)
    for ax, (group, title, batches, labels) in zip(axes[0], panels):
        for label in labels:
            # CBN: window running statistics (solid); the paper also as published (batch)
            variants = [('acc', '-')] if not is_cbn(label) else [('acc_window', '-')]
            if label == PAPER:
                variants.append(('acc', ':'))
            for field, style in variants:
                xs, ms, ss = [], [], []
                for b in batches:
                    vals = [r[field] for r in _select(results, group=group, label=label, batch=b)]
                    vals = [v if v == v else 0.1 for v in vals]  # a failed run scores chance
                    if vals:
                        xs.append(b)
                        ms.append(np.mean(vals))
                        ss.append(np.std(vals))
                if xs:
                    name = display(label) + (' (running stats from batch)'
                                             if is_cbn(label) and field == 'acc' else '')
                    ax.errorbar(xs, ms, yerr=ss, fmt=style + 'o', color=_color(label),
                                label=name, capsize=3, ms=4, alpha=0.85)
        ax.set_xscale('log', base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel('batch size (window k = 32 / batch for CBN; lr ∝ batch)')
        ax.set_ylabel('test accuracy')
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        lo = min([ln.get_ydata().min() for ln in ax.get_lines() if len(ln.get_ydata())] + [0.8])
        ax.set_ylim(max(0.0, min(0.8, lo - 0.02)), None)
        ax.legend(fontsize=7, title='CBN rows: running stats from the window',
                  title_fontsize=7, loc='lower left')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_errors(results, args, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    sweep = [r for r in results if r['cfg']['group'] == 'sweep' and 'analysis' in r
             and r['cfg']['label'] == PAPER]
    if not sweep:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    est = [('current', 'current batch alone (BN)', 'C0'), ('naive', 'naive pooling', 'C7'),
           ('munu', 'CBN, (mu, nu) compensation', 'C3'),
           ('varform', 'CBN, var compensation', 'C1')]
    styles = ('-', '--', ':', '-.', (0, (1, 4)))
    for base, style in zip(args.sweep_base_lrs, styles):
        rs_lr = [r for r in sweep if r['cfg']['base_lr'] == base]
        ks = sorted({r['cfg']['norm']['window'] for r in rs_lr})
        for ax, quantity in zip(axes[:2], ('mean', 'std')):
            for key, _, color in est:
                if quantity == 'mean' and key == 'varform':
                    continue  # the same mean as the (mu, nu) form's
                ys = [_analysis_mean(_select(rs_lr, window=k), f'win_{quantity}_err_{key}')
                      for k in ks]
                ax.plot(ks, ys, 'o', linestyle=style, color=color, ms=4)
        for key, color, marker in (('neg_frac_comp', 'C3', 'o'),
                                   ('neg_frac_varform', 'C1', 's')):
            ys = [100 * _analysis_mean(_select(rs_lr, window=k), key) for k in ks]
            axes[2].plot(ks, ys, marker, linestyle=style, color=color, ms=4)
    titles = ('mean error vs the true window mean\n(RMS over channels, units of window std)',
              'std error vs the true window std\n(RMS over channels of |log sigma ratio|)',
              '% of past entries with negative variance\n(before the clamp)')
    for ax, title in zip(axes, titles):
        ax.set_xscale('log', base=2)
        ax.set_xticks(args.sweep_windows)
        ax.set_xticklabels([str(k) for k in args.sweep_windows])
        ax.set_xlabel(f'window k (batch {args.sweep_batch}, runs trained with the paper\'s '
                      'layer, mean over layers)', fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yscale('log')
    axes[1].set_yscale('log')
    lr_handles = [Line2D([], [], color='k', linestyle=st,
                         label=f'lr {lr_for(args.sweep_batch, base):g}')
                  for base, st in zip(args.sweep_base_lrs, styles)]
    axes[0].legend(handles=[Line2D([], [], color=c, marker='o', label=n) for k, n, c in est
                            if k != 'varform'] + lr_handles, fontsize=7)
    axes[1].legend(handles=[Line2D([], [], color=c, marker='o', label=n) for _, n, c in est],
                   fontsize=7)
    axes[2].legend(handles=[Line2D([], [], color='C3', marker='o', label='(mu, nu) form'),
                            Line2D([], [], color='C1', marker='s', label='var form')]
                   + lr_handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
