# Copyright (c) OpenMMLab. All rights reserved. Adapted for cbn_plugin.
"""Train a detector with the CBN plugin (mmdet 3.3.0's ``tools/train.py`` plus two things).

Same command line as MMDetection's: ``config``, ``--work-dir``, ``--amp``,
``--auto-scale-lr``, ``--resume [auto|PATH]``, ``--cfg-options``,
``--launcher``. Runs on CPU when no GPU exists (MMEngine picks the device);
``tools/dist_train.sh`` launches it on several GPUs.

What differs from MMDetection's script:

1. ``cbn_plugin`` is imported (registering ``'CBN'`` in MODELS and the hooks)
   and MMDetection's modules are registered; the default scope is the
   config's ``default_scope`` (``'mmdet'`` when the config has none).
2. ``WeightsOnlyCheckpointHook`` (``cbn_plugin.checkpoint``) is appended to
   ``cfg.custom_hooks`` when the config does not list it. It makes every
   checkpoint loadable by plain ``torch.load(path)``, whose default since
   torch 2.6 is ``weights_only=True`` (MMEngine 0.10.7 pickles numpy and
   HistoryBuffer objects into checkpoints, which that refuses), and restores
   those objects when a checkpoint is loaded or resumed. Set
   ``weights_only_checkpoints = False`` in the config to leave it out.
"""
import argparse
import os
import os.path as osp
import sys

# Make the repository importable when run as ``python tools/train.py``.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import cbn_plugin  # noqa: E402,F401  (registers 'CBN')
from cbn_plugin.checkpoint import add_weights_only_hook  # noqa: E402
from mmdet.utils import register_all_modules, setup_cache_size_limit_of_dynamo  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description='Train a detector (with cbn_plugin)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='enable automatically scaling LR.')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='If specify checkpoint path, resume from it, while if not '
        'specify, try to auto resume from the latest checkpoint '
        'in the work directory.')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.run passes --local-rank (torch >= 2.0) or sets LOCAL_RANK.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)

    return args


def main():
    args = parse_args()

    # Register mmdet's modules; the scope itself comes from the config.
    register_all_modules(init_default_scope=False)
    # Reduce the number of repeated compilations and improve training speed.
    setup_cache_size_limit_of_dynamo()

    # load config
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if cfg.get('default_scope', None) is None:
        cfg.default_scope = 'mmdet'

    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        # update configs according to CLI args if args.work_dir is not None
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        # use config filename as default work_dir if cfg.work_dir is None
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

    # enable automatic-mixed-precision training
    if args.amp is True:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'

    # enable automatically scaling LR
    if args.auto_scale_lr:
        if 'auto_scale_lr' in cfg and \
                'enable' in cfg.auto_scale_lr and \
                'base_batch_size' in cfg.auto_scale_lr:
            cfg.auto_scale_lr.enable = True
        else:
            raise RuntimeError('Can not find "auto_scale_lr" or '
                               '"auto_scale_lr.enable" or '
                               '"auto_scale_lr.base_batch_size" in your'
                               ' configuration file.')

    # resume is determined in this priority: resume from > auto_resume
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    # checkpoints loadable with torch.load's default weights_only=True
    add_weights_only_hook(cfg)

    # build the runner from config
    if 'runner_type' not in cfg:
        # build the default runner
        runner = Runner.from_cfg(cfg)
    else:
        # build customized runner from the registry
        # if 'runner_type' is set in the cfg
        runner = RUNNERS.build(cfg)

    # start training
    runner.train()


if __name__ == '__main__':
    main()
