# Copyright (c) OpenMMLab. All rights reserved. Adapted for cbn_plugin.
"""Test (and evaluate) a detector with the CBN plugin (mmdet 3.3.0's ``tools/test.py``).

Same command line as MMDetection's: ``config checkpoint``, ``--work-dir``,
``--out`` (a .pkl of predictions), ``--show``, ``--show-dir``,
``--wait-time``, ``--cfg-options``, ``--launcher``, ``--tta``. Runs on CPU
when no GPU exists. ``tools/dist_test.sh CONFIG CKPT N`` launches N processes
with torchrun, ``tools/slurm_test.sh`` with Slurm's ``srun``: on N GPUs, or
on CPU with the gloo backend (``setup_cpu_distributed`` from
``tools/train.py``: MMEngine 0.10.7's launcher setup needs a GPU, so without
one the process group is initialised here and the DDP wrapper gets
``device_ids=None``; see ``tools/train.py``'s docstring).

As in ``tools/train.py``: ``cbn_plugin`` is imported, MMDetection's modules
are registered (default scope from the config, ``'mmdet'`` if none), and
``WeightsOnlyCheckpointHook`` is appended to ``cfg.custom_hooks`` so that the
objects ``cbn_plugin.checkpoint`` encoded are restored on load. The
checkpoint itself is read by MMEngine with ``torch.load``'s default
``weights_only=True``.
"""
import argparse
import os
import os.path as osp
import sys
import warnings
from copy import deepcopy

# Make the repository importable when run as ``python tools/test.py``.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine import ConfigDict  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import cbn_plugin  # noqa: E402,F401  (registers 'CBN')
# tools/train.py: Python puts this script's folder, tools/, on sys.path.
from train import setup_cpu_distributed  # noqa: E402
from cbn_plugin.checkpoint import add_weights_only_hook  # noqa: E402
from mmdet.engine.hooks.utils import trigger_visualization_hook  # noqa: E402
from mmdet.evaluation import DumpDetResults  # noqa: E402
from mmdet.registry import RUNNERS  # noqa: E402
from mmdet.utils import register_all_modules, setup_cache_size_limit_of_dynamo  # noqa: E402


# TODO (as upstream): support fuse_conv_bn and format_only
def parse_args():
    parser = argparse.ArgumentParser(
        description='MMDet test (and eval) a model (with cbn_plugin)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='dump predictions to a pickle file for offline evaluation')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved. '
        'If specified, it will be automatically saved '
        'to the work_dir/timestamp/show_dir')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
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
    parser.add_argument('--tta', action='store_true')
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
    # Reduce the number of repeated compilations and improve testing speed.
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

    cfg.load_from = args.checkpoint

    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)

    if args.tta:

        if 'tta_model' not in cfg:
            warnings.warn('Cannot find ``tta_model`` in config, '
                          'we will set it as default.')
            cfg.tta_model = dict(
                type='DetTTAModel',
                tta_cfg=dict(
                    nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
        if 'tta_pipeline' not in cfg:
            warnings.warn('Cannot find ``tta_pipeline`` in config, '
                          'we will set it as default.')
            test_data_cfg = cfg.test_dataloader.dataset
            while 'dataset' in test_data_cfg:
                test_data_cfg = test_data_cfg['dataset']
            cfg.tta_pipeline = deepcopy(test_data_cfg.pipeline)
            flip_tta = dict(
                type='TestTimeAug',
                transforms=[
                    [
                        dict(type='RandomFlip', prob=1.),
                        dict(type='RandomFlip', prob=0.)
                    ],
                    [
                        dict(
                            type='PackDetInputs',
                            meta_keys=('img_id', 'img_path', 'ori_shape',
                                       'img_shape', 'scale_factor', 'flip',
                                       'flip_direction'))
                    ],
                ])
            cfg.tta_pipeline[-1] = flip_tta
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline

    # restore what cbn_plugin.checkpoint encoded when the checkpoint is loaded
    add_weights_only_hook(cfg)

    # distributed on CPU (gloo): what MMEngine's launcher setup cannot do
    setup_cpu_distributed(cfg)

    # build the runner from config
    if 'runner_type' not in cfg:
        # build the default runner
        runner = Runner.from_cfg(cfg)
    else:
        # build customized runner from the registry
        # if 'runner_type' is set in the cfg
        runner = RUNNERS.build(cfg)

    # add `DumpResults` dummy metric
    if args.out is not None:
        assert args.out.endswith(('.pkl', '.pickle')), \
            'The dump file must be a pkl file.'
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))

    # start testing
    runner.test()


if __name__ == '__main__':
    main()
