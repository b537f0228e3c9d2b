"""Embedded detection demo: a small Faster R-CNN with CBN, trained from scratch on CPU.

``make demo`` runs this script with no arguments. It

1. writes the handwritten-digits detection set (``tools/make_digits_det.py``,
   scikit-learn's real 8x8 digits on cluttered 128-px canvases, 10 classes,
   train/val split by source digit) into ``data/digits_det/`` if it is not
   there yet;
2. trains ``configs/demo/faster-rcnn_r18-w32_fpn_4conv1fc-cbn_digits.py``
   (CBN in the FPN and the box-head convs, 2 images per batch) through
   MMEngine's ``Runner``, printing a log line every 100 iterations;
3. evaluates it on the val split with MMDetection's ``CocoMetric`` in the same
   process, right after training (no checkpoint is written or reloaded), and
   prints a table with mAP and mAP50.

``--compare`` (``make demo-compare``) trains the BN, GN, naive-CBN and CBN
configs and CBN with sampled derivatives (``dvar_stride`` 2 and 4) in turn,
then rewrites the generated section of ``docs/demo.md`` and
``docs/demo_compare.png`` (training loss and val mAP per norm).

Small runs for tests: ``--max-iters 2 --num-train 4 --num-val 2 --data-root DIR
--work-dir DIR``. With ``--max-iters`` the learning-rate schedule and the CBN
burn-in are scaled with the number of iterations.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tools'))

import make_digits_det  # noqa: E402

CONFIG_DIR = REPO / 'configs' / 'demo'
CONFIG_STEM = 'faster-rcnn_r18-w32_fpn_4conv1fc-{}_digits.py'
NORMS = ('bn', 'gn', 'naive-cbn', 'cbn', 'cbn-s2', 'cbn-s4')
LABELS = {'bn': 'BN', 'gn': 'GN', 'naive-cbn': 'naive CBN', 'cbn': 'CBN',
          'cbn-s2': 'CBN sampled s=2', 'cbn-s4': 'CBN sampled s=4'}
DOC_BEGIN = '<!-- demo-compare:begin (written by tools/demo.py --compare; do not edit) -->'
DOC_END = '<!-- demo-compare:end -->'


def config_path(norm: str) -> Path:
    return CONFIG_DIR / CONFIG_STEM.format(norm)


# ----------------------------------------------------------------------------- data


def ensure_data(root: Path, num_train: int, num_val: int, seed: int) -> None:
    """Write the dataset unless ``root`` already holds exactly this one."""
    wanted = dict(num_train=num_train, num_val=num_val, seed=seed,
                  version=make_digits_det.FORMAT_VERSION)
    manifest = root / 'demo_manifest.json'
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted and all(
            (root / 'annotations' / f'{s}.json').is_file() for s in make_digits_det.SPLITS):
        print(f'data: reusing {root}', flush=True)
        return
    start = time.perf_counter()
    if manifest.is_file():
        manifest.unlink()
    summary = make_digits_det.build(root, num_train=num_train, num_val=num_val, seed=seed)
    manifest.write_text(json.dumps(wanted, sort_keys=True) + '\n')
    print(f'data: wrote {root} in {time.perf_counter() - start:.0f}s: ' + ', '.join(
        f'{s} {summary[s]["images"]} images / {summary[s]["boxes"]} digits '
        f'(from {summary[s]["source_digits"]} source digits)' for s in make_digits_det.SPLITS),
        flush=True)


# ----------------------------------------------------------------------------- config


def load_config(norm: str, args):
    """The demo config for ``norm`` with the command line's data, size and schedule."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(config_path(norm)))
    root = str(args.data_root).rstrip('/') + '/'
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = root
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        evaluator.ann_file = root + 'annotations/val.json'
    cfg.work_dir = str(Path(args.work_dir) / norm)
    cfg.randomness = dict(seed=args.seed, deterministic=False)
    if args.log_interval:
        cfg.default_hooks.logger.interval = args.log_interval
        cfg.log_processor.window_size = args.log_interval
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.max_iters is not None:
        scale_schedule(cfg, args.max_iters)
    return cfg


def scale_schedule(cfg, max_iters: int) -> None:
    """Stretch or shrink the iteration schedule (warm-up, lr steps, CBN burn-in)."""
    old = cfg.train_cfg.max_iters
    ratio = max_iters / old

    def at(it):
        return int(round(it * ratio))

    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = max_iters
    for sched in cfg.param_scheduler:
        if 'begin' in sched:
            sched.begin = at(sched.begin)
        if 'end' in sched:
            sched.end = max(at(sched.end), sched.get('begin', 0) + 1)
        if 'milestones' in sched:
            sched.milestones = [at(m) for m in sched.milestones]
    for hook in cfg.get('custom_hooks', []):
        if hook.get('type') == 'CBNHook' and hook.get('burn_in_iters') is not None:
            hook.burn_in_iters = min(at(hook.burn_in_iters), max_iters - 1)


# ----------------------------------------------------------------------------- training


def make_recorder():
    from mmengine.hooks import Hook

    class DemoRecorder(Hook):
        """Keeps the training loss per iteration and the val metrics, in memory."""
        priority = 'LOWEST'

        def __init__(self):
            self.losses, self.metrics = [], {}

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if outputs and 'loss' in outputs:
                self.losses.append(float(outputs['loss'].detach()))

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = dict(metrics or {})

    return DemoRecorder()


def train_and_evaluate(norm: str, args) -> dict:
    """Train one demo config through MMEngine's Runner and validate it at the end."""
    from mmengine.runner import Runner
    cfg = load_config(norm, args)
    print(f'\n=== {LABELS[norm]}: {config_path(norm).relative_to(REPO)} '
          f'({cfg.train_cfg.max_iters} iterations, batch {cfg.train_dataloader.batch_size}) ===',
          flush=True)
    runner = Runner.from_cfg(cfg)
    recorder = make_recorder()
    runner.register_hook(recorder, priority='LOWEST')
    start = time.perf_counter()
    runner.train()  # the loop validates after its last iteration (val_interval = max_iters)
    seconds = time.perf_counter() - start
    m = recorder.metrics
    tail = recorder.losses[-max(1, len(recorder.losses) // 10):]
    burn_in = [h.get('burn_in_iters') for h in cfg.get('custom_hooks', []) if h.type == 'CBNHook']
    return dict(norm=norm, label=LABELS[norm], iters=cfg.train_cfg.max_iters,
                burn_in=burn_in[0] if burn_in else None,
                mAP=m.get('coco/bbox_mAP', float('nan')),
                mAP50=m.get('coco/bbox_mAP_50', float('nan')),
                mAP75=m.get('coco/bbox_mAP_75', float('nan')),
                final_loss=sum(tail) / len(tail) if tail else float('nan'),
                losses=recorder.losses, seconds=seconds)


def table(results: list[dict], markdown: bool = False) -> str:
    head = ('norm (FPN + box head)', 'iters', 'mAP', 'mAP50', 'mAP75', 'final loss', 'train+val')
    rows = [(r['label'], str(r['iters']), f'{r["mAP"]:.3f}', f'{r["mAP50"]:.3f}',
             f'{r["mAP75"]:.3f}', f'{r["final_loss"]:.3f}', f'{r["seconds"]:.0f} s')
            for r in results]
    if markdown:
        lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
        return '\n'.join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = '  '.join(f'{{:<{w}}}' if i == 0 else f'{{:>{w}}}' for i, w in enumerate(widths))
    return '\n'.join([fmt.format(*head)] + [fmt.format(*row) for row in rows])


# ----------------------------------------------------------------------------- compare


def threads_text(threads: int) -> str:
    return f'{threads} torch thread' + ('s' if threads != 1 else '')


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_compare(run: dict, docs_dir: str) -> None:
    """Rewrite docs/demo.md's generated section and docs/demo_compare.png from a
    saved comparison (``compare_results.json``: the run's settings and results)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    results = run['results']
    docs = Path(docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        ax_loss.plot(range(1, len(r['losses']) + 1), smooth(r['losses'], 50), label=r['label'],
                     linewidth=1)
    burn_in = [r['burn_in'] for r in results if r.get('burn_in')]
    if burn_in:
        ax_loss.axvline(burn_in[0], color='grey', linestyle=':', linewidth=1)
        ax_loss.annotate('CBN burn-in ends', (burn_in[0], 1), xycoords=('data', 'axes fraction'),
                         xytext=(3, -12), textcoords='offset points', fontsize=8, color='grey')
    ax_loss.set_xlabel('iteration')
    ax_loss.set_ylabel('training loss (mean of the last 50 iterations)')
    ax_loss.set_yscale('log')
    ax_loss.legend(loc='lower left', fontsize=8)
    x = range(len(results))
    ax_map.bar([i - 0.2 for i in x], [r['mAP'] for r in results], 0.4, label='mAP')
    ax_map.bar([i + 0.2 for i in x], [r['mAP50'] for r in results], 0.4, label='mAP50')
    ax_map.set_xticks(list(x), [r['label'].replace(' ', '\n') for r in results])
    ax_map.set_ylabel('COCO box mAP on val')
    for i, r in enumerate(results):
        for dx, value in ((-0.2, r['mAP']), (0.2, r['mAP50'])):
            ax_map.annotate(f'{value:.3f}', (i + dx, value), ha='center', va='bottom',
                            fontsize=8, xytext=(0, 2), textcoords='offset points')
    ax_map.set_ylim(0, 1.15)
    ax_map.legend(loc='upper center', ncol=2)
    fig.suptitle(f'Faster R-CNN R18-w32-FPN from scratch, digits, batch 2, '
                 f'{results[0]["iters"]} iterations, seed {run["seed"]}')
    fig.tight_layout()
    png = docs / 'demo_compare.png'
    fig.savefig(png, dpi=100)
    plt.close(fig)

    section = '\n'.join([
        DOC_BEGIN,
        '',
        f'Generated by `{run["command"]}` on {run["started"]} '
        f'(total {run["wall_s"] / 60:.1f} min, {run["cpus"]} CPU cores, '
        f'{threads_text(run["threads"])}, load average before start {run["load_before"]}).',
        '',
        table(results, markdown=True),
        '',
        f'![loss and mAP per norm]({png.name})',
        '',
        DOC_END,
    ])
    doc = docs / 'demo.md'
    text = doc.read_text() if doc.is_file() else '# Detection demo\n\n' + DOC_BEGIN + '\n' + DOC_END
    if DOC_BEGIN in text and DOC_END in text:
        text = re.sub(re.escape(DOC_BEGIN) + '.*?' + re.escape(DOC_END),
                      lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip('\n') + '\n\n## Comparison\n\n' + section
    doc.write_text(text.rstrip('\n') + '\n')
    print(f'wrote {doc} and {png}', flush=True)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--norm', choices=NORMS, default='cbn', help='config to train')
    parser.add_argument('--compare', action='store_true',
                        help='train every norm of --norms; write docs/demo.md and docs/demo_compare.png')
    parser.add_argument('--norms', nargs='+', choices=NORMS, default=list(NORMS),
                        help='the norms --compare trains')
    parser.add_argument('--from-json', metavar='FILE', default=None,
                        help='no training: rewrite --compare\'s docs from a saved '
                        'compare_results.json (presentation changes)')
    parser.add_argument('--max-iters', type=int, default=None,
                        help='training iterations (default: the config\'s); the lr schedule '
                        'and the CBN burn-in are scaled with it')
    parser.add_argument('--num-train', type=int, default=1600, help='train canvases')
    parser.add_argument('--num-val', type=int, default=300, help='val canvases')
    parser.add_argument('--data-root', default='data/digits_det', help='dataset directory')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='logs go here')
    parser.add_argument('--docs-dir', default=str(REPO / 'docs'), help='--compare writes here')
    parser.add_argument('--seed', type=int, default=0, help='data and training seed')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads (1 is fastest on a shared 2-core machine; see '
                        'docs/demo.md)')
    parser.add_argument('--log-interval', type=int, default=None,
                        help='iterations per log line (default: the config\'s, 100)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override config keys, key=value (as tools/train.py)')
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.from_json:
        run = json.loads(Path(args.from_json).read_text())
        write_compare(run, args.docs_dir)
        return run['results']
    started = time.strftime('%Y-%m-%d %H:%M')
    args.load_before = ' '.join(f'{x:.2f}' for x in os.getloadavg())
    wall = time.perf_counter()
    import torch
    torch.set_num_threads(args.threads)
    import cbn_plugin  # noqa: F401  (registers 'CBN' and CBNHook)
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)

    ensure_data(Path(args.data_root), args.num_train, args.num_val, args.seed)
    norms = list(args.norms) if args.compare else [args.norm]
    results = [train_and_evaluate(norm, args) for norm in norms]
    wall = time.perf_counter() - wall

    print(f'\nFaster R-CNN R18-w32-FPN from scratch on {args.data_root} '
          f'(val: {args.num_val} canvases of unseen digits), batch 2, COCO box mAP:\n')
    print(table(results))
    print(f'\ntotal {wall / 60:.1f} min ({threads_text(args.threads)}; load average at start '
          f'{args.load_before})', flush=True)
    if args.compare:
        run = dict(command=' '.join(['python tools/demo.py'] + sys.argv[1:]), started=started,
                   wall_s=wall, cpus=os.cpu_count(), threads=args.threads,
                   load_before=args.load_before, seed=args.seed, results=results)
        dump = Path(args.work_dir) / 'compare_results.json'
        dump.write_text(json.dumps(run, sort_keys=True) + '\n')
        write_compare(run, args.docs_dir)
    bad = [r['label'] for r in results if not math.isfinite(r['mAP'])]
    if bad:
        raise SystemExit(f'no val metrics for {", ".join(bad)}')
    return results


if __name__ == '__main__':
    main()
