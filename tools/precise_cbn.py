"""Recompute a trained checkpoint's BN/CBN inference statistics with the weights fixed.

    python tools/precise_cbn.py CONFIG CHECKPOINT [--num-batches 200] [--window K]
        [--out OUT.pth] [--cfg-options ...]

Builds the config's model and train dataloader (as ``tools/train.py``, through
``tools/launch_support.py``), loads CHECKPOINT, runs
``cbn_plugin.precise_bn.recompute_statistics`` on ``--num-batches`` training batches (CBN layers pool their window as training
normalised with, plain BN layers use one batch: see that module) and writes
OUT (default: ``CHECKPOINT`` with ``_precise`` before ``.pth``): the same
checkpoint with only the recomputed ``running_mean``/``running_var`` changed,
loadable with plain ``torch.load`` (weights_only), written atomically. Prints
one line per layer: its window, the number of estimates, and the largest
relative change of its running mean (in standard deviations) and variance.
Evaluate the result with ``tools/test.py CONFIG OUT``.
"""
import argparse
import itertools
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from cbn_plugin.engine import (check_checkpoint_file, encode_checkpoint,  # noqa: E402
                               load_checkpoint, save_checkpoint_file)
from launch_support import (add_cfg_options_and_launcher, build_runner,  # noqa: E402
                            load_config)
from cbn_plugin.precise_bn import recompute_statistics  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Recompute BN/CBN running statistics')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--num-batches', type=int, default=200,
                        help='training batches to run (at least the largest CBN window)')
    parser.add_argument('--window', type=int, default=None,
                        help='window for every CBN layer (default: each layer\'s window_size)')
    parser.add_argument('--out', help='output checkpoint (default: CHECKPOINT_precise.pth)')
    parser.add_argument('--work-dir', help='work dir of the Runner built for the data '
                        '(default: a precise_cbn folder beside the output)')
    add_cfg_options_and_launcher(parser)
    return parser.parse_args(argv)


def passes(loader):
    """The loader's batches, pass after pass (each pass shuffled as that epoch of training)."""
    sampler = getattr(getattr(loader, 'batch_sampler', None), 'sampler', None)
    sampler = sampler if hasattr(sampler, 'set_epoch') else getattr(loader, 'sampler', None)
    for epoch in itertools.count():
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
        yield from loader


def main(argv=None):
    args = parse_args(argv)
    if args.launcher != 'none':
        raise SystemExit('tools/precise_cbn.py runs in one process: use --launcher none')
    check_checkpoint_file(args.checkpoint)
    out = args.out or osp.splitext(args.checkpoint)[0] + '_precise.pth'
    if args.work_dir is None:
        args.work_dir = osp.join(osp.dirname(osp.abspath(out)), 'precise_cbn')
    cfg = load_config(args)
    cfg.load_from, cfg.resume = None, False
    runner = build_runner(cfg)
    runner.load_checkpoint(args.checkpoint, map_location='cpu')
    report = recompute_statistics(runner.model, passes(runner.train_dataloader),
                                  args.num_batches, window=args.window)
    checkpoint = load_checkpoint(args.checkpoint, map_location='cpu')
    state = checkpoint['state_dict']
    model = runner.model.module if hasattr(runner.model, 'module') else runner.model
    modules = dict(model.named_modules())
    for name in report:
        for key in ('running_mean', 'running_var'):
            full = f'{name}.{key}' if name else key
            if full not in state:
                raise KeyError(f'{args.checkpoint} has no {full!r}: not a checkpoint of this '
                               'config\'s model')
            state[full] = getattr(modules[name], key).detach().to(state[full].dtype).clone()
    save_checkpoint_file(encode_checkpoint(checkpoint), out)
    width = max(len(n) for n in report) if report else 0
    for name, r in report.items():
        print(f'{name:<{width}}  window {r["window"]}  estimates {r["estimates"]}  '
              f'mean change {r["mean_change"]:.3g} sd  var change {r["var_change"]:.3g}')
    print(f'recomputed {len(report)} norm layers from {args.num_batches} batches: {out}')


if __name__ == '__main__':
    main()
