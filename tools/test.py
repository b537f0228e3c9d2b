# Copyright (c) OpenMMLab. All rights reserved. Adapted for cbn_plugin.
"""Test (and evaluate) a detector with the CBN plugin (mmdet 3.3.0's ``tools/test.py``).

Same command line as MMDetection's: ``config checkpoint``, ``--work-dir``,
``--out`` (a .pkl of predictions), ``--show``, ``--show-dir``,
``--wait-time``, ``--cfg-options``, ``--launcher``, ``--tta``. Runs on CPU
when no GPU exists. ``tools/dist_test.sh CONFIG CKPT N`` launches N processes
with torchrun, ``tools/slurm_test.sh`` with Slurm's ``srun``: on N GPUs, or
on CPU with the gloo backend.

As in ``tools/train.py``, through ``tools/launch_support.py``: the plugin is
imported, MMDetection's modules are registered (default scope from the
config, ``'mmdet'`` if none), the checkpoint hooks are appended to
``cfg.custom_hooks`` (``CheckpointFileCheckHook`` refuses a damaged file by
name; ``CheckpointCodecHook`` restores what the plugin encoded in the
checkpoint, which MMEngine reads with ``torch.load``'s default
``weights_only=True``), and
a distributed run without a GPU is set up with gloo, and a distributed run
that finished destroys its process group before the interpreter shuts down.
"""
import argparse
import os.path as osp
import sys
import warnings
from copy import deepcopy

# Make the repository importable when run as ``python tools/test.py`` (this
# folder, with launch_support.py, is on sys.path as the script's own).
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine import ConfigDict  # noqa: E402

from launch_support import (add_cfg_options_and_launcher, build_runner,  # noqa: E402
                            finish_distributed, load_config, parse_with_local_rank)
from mmdet.engine.hooks.utils import trigger_visualization_hook  # noqa: E402
from mmdet.evaluation import DumpDetResults  # noqa: E402
from mmdet.registry import RUNNERS  # noqa: E402


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
    add_cfg_options_and_launcher(parser)
    parser.add_argument('--tta', action='store_true')
    return parse_with_local_rank(parser)


def main():
    args = parse_args()
    # mmdet's modules registered, config loaded, --cfg-options and --work-dir applied
    cfg = load_config(args)

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

    # the checkpoint hooks (CheckpointCodecHook restores what cbn_plugin.engine
    # encoded when the checkpoint is loaded), distributed on CPU, the runner
    runner = build_runner(cfg, RUNNERS)

    # add `DumpResults` dummy metric
    if args.out is not None:
        assert args.out.endswith(('.pkl', '.pickle')), \
            'The dump file must be a pkl file.'
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))

    # start testing
    runner.test()
    finish_distributed()


if __name__ == '__main__':
    main()
