"""What the study runs: the row labels, their norm specs, and the grid of runs (jobs)."""
from __future__ import annotations

from .models import LAYER_DEFAULTS

LARGEST_BATCH = 32  # k = 32 / batch: the window always spans this many samples
BACKWARDS = ('current', 'pooled', 'compensated')
FORMS = ('mu_nu', 'var')


def cbn_label(backward: str, compensation: str) -> str:
    return f'CBN ({backward}, {compensation})'


PAPER = cbn_label('current', 'mu_nu')
DEFAULT = cbn_label(LAYER_DEFAULTS['stats_backward'], LAYER_DEFAULTS['compensation'])
PLAIN = 'CBN() (k=4)'
NORMS = {  # row label -> norm spec (window filled in per batch)
    'BN': dict(kind='bn'),
    'GN': dict(kind='gn'),
    'naive CBN': dict(kind='cbn', rho=0.0, backward='current', compensation='mu_nu'),
}
for _b in BACKWARDS:
    for _c in FORMS:
        NORMS[cbn_label(_b, _c)] = dict(kind='cbn', rho=1.0, backward=_b, compensation=_c)
# the paper's layer exactly (mode='paper'): its own running statistics from the batch
NORMS[PAPER]['running_stats'] = 'batch'
# norm_cfg=dict(type='CBN'): every argument the layer's default, window 4 at every batch
NORMS[PLAIN] = dict(kind='cbn', plain=True, window=LAYER_DEFAULTS['window_size'])
CBN_COMBOS = [cbn_label(b, c) for b in BACKWARDS for c in FORMS]


def display(label: str) -> str:
    """Row name: says which row is the layer's defaults and which is the paper."""
    if label == DEFAULT:
        return f'{label} = CBN(window_size=k)'
    if label == PAPER:
        return f'{label} = paper'
    return label


def is_cbn(label: str) -> bool:
    return NORMS[label]['kind'] == 'cbn'


def window_for(batch: int) -> int:
    return max(1, LARGEST_BATCH // batch)


def lr_for(batch: int, base: float) -> float:
    return base * batch / LARGEST_BATCH


def spec_for(label: str, batch: int, window: int | None = None) -> dict:
    spec = dict(NORMS[label])
    if spec['kind'] == 'cbn' and not spec.get('plain'):
        k = window or window_for(batch)
        if k == 1:  # window 1 is BN's computation whatever the other options: one run
            return dict(kind='cbn', window=1)
        spec['window'] = k
    return spec


def build_grid(args) -> list[dict]:
    jobs = []
    base = dict(samples=args.samples, wd=5e-4, measure=0)

    def add(group, label, batch, base_lr, seed, task='lowres', arch='cnn', window=None,
            measure=None):
        spec = spec_for(label, batch, window)
        if measure is None:
            measure = args.measure if spec['kind'] == 'cbn' and spec['window'] > 1 \
                else args.measure_bn
        jobs.append(dict(base, group=group, label=label, task=task, arch=arch, norm=spec,
                         batch=batch, lr=lr_for(batch, base_lr), base_lr=base_lr, seed=seed,
                         measure=measure))

    for seed in range(args.seeds):
        for b in args.batches:
            for label in args.norms:
                if seed == 0 or label in args.seed_norms:
                    add('main', label, b, args.base_lr, seed)
        for b in args.raw_batches:
            add('raw', 'BN', b, args.base_lr, seed, task='raw', measure=0)
    for seed in range(args.resnet_seeds):
        for b in args.resnet_batches:
            for label in args.resnet_norms:
                add('resnet', label, b, args.base_lr, seed, arch='resnet',
                    measure=args.measure if is_cbn(label) and b < LARGEST_BATCH else 0)
    for seed in range(args.second_seeds):
        for b in args.second_batches:
            for label in args.second_norms:
                add('second', label, b, args.base_lr, seed, task=args.second_task,
                    arch=args.second_arch, measure=0)
    for base_lr in args.sweep_base_lrs:
        for b in args.lr_batches:
            for label in args.lr_norms:
                if b == LARGEST_BATCH and is_cbn(label):
                    continue  # k = 1: BN
                if b not in args.lr_paper_batches and label == PAPER:
                    continue
                add('lrsweep', label, b, base_lr, 0)
        for k in args.sweep_windows:
            for label in args.sweep_norms:
                add('sweep', label, args.sweep_batch, base_lr, 0, window=k)
    # more seeds where the defaults fall short: the largest lr, batch 2
    top = max(args.sweep_base_lrs)
    for seed in range(1, args.top_lr_seeds):
        for b, label in ((LARGEST_BATCH, 'BN'), (2, 'BN'), (2, 'GN'), (2, DEFAULT)):
            if b in args.lr_batches and label in args.lr_norms:
                add('lrsweep', label, b, top, seed)
    return jobs


def build_precise_grid(args) -> list[dict]:
    jobs = []
    for seed in range(args.seeds):
        for b in args.precise_batches:
            for label in args.precise_norms:
                if b == LARGEST_BATCH and is_cbn(label):
                    continue  # k = 1: BN
                jobs.append(dict(group='precise', label=label, task='lowres', arch='cnn',
                                 norm=spec_for(label, b), batch=b, lr=lr_for(b, args.base_lr),
                                 base_lr=args.base_lr, seed=seed, samples=args.samples,
                                 wd=5e-4, measure=0, precise_samples=args.precise_samples))
    return jobs
