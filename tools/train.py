# Copyright (c) OpenMMLab. All rights reserved. Adapted for cbn_plugin.
"""Train a detector with the CBN plugin (mmdet 3.3.0's ``tools/train.py`` plus three things).

Same command line as MMDetection's: ``config``, ``--work-dir``, ``--amp``,
``--auto-scale-lr``, ``--resume [auto|PATH]``, ``--cfg-options``,
``--launcher``. Runs on CPU when no GPU exists (MMEngine picks the device).
``tools/dist_train.sh CONFIG N`` launches N processes with torchrun
(``--launcher pytorch``), ``tools/slurm_train.sh`` with Slurm's ``srun``
(``--launcher slurm``): on N GPUs, or on CPU with the gloo backend.

What differs from MMDetection's script is shared with ``tools/test.py``
through ``tools/launch_support.py`` (see ``docs/checkpoints.md``):

1. ``cbn_plugin`` and ``cbn_plugin.engine`` are imported (registering ``'CBN'``
   and the hooks) and MMDetection's modules are registered; the default scope
   is the config's ``default_scope`` (``'mmdet'`` when the config has none).
2. The checkpoint hooks of ``cbn_plugin.engine`` are appended to
   ``cfg.custom_hooks``, one per concern, those the config does not list:
   ``CheckpointFileCheckHook`` (files checked before loading),
   ``AtomicCheckpointHook`` (atomic writes), ``RankStateHook`` and
   ``ResumeRNGHook`` (exact resume: every rank's CBN windows and RNG states;
   with ``--resume`` and no ``randomness.seed`` the checkpoint's seed is
   adopted) and ``CheckpointCodecHook`` (checkpoints that plain
   ``torch.load(path)``, ``weights_only=True``, reads); each has a top-level
   config switch (``check_checkpoint_files``, ``atomic_checkpoints``,
   ``resume_rank_states``, ``resume_rng_state``, ``weights_only_checkpoints``;
   all ``True`` unless set ``False``).
3. Distributed runs without a GPU: the process group is initialised with gloo
   and the DDP wrapper gets ``device_ids=None`` (``setup_cpu_distributed``).
4. A distributed run that finished ends with a barrier and
   ``destroy_process_group`` (``finish_distributed``): a group left to the
   interpreter's shutdown can abort a finished process.
"""
import argparse
import os.path as osp
import sys

# Make the repository importable when run as ``python tools/train.py`` (this
# folder, with launch_support.py, is on sys.path as the script's own).
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from launch_support import (add_cfg_options_and_launcher, build_runner,  # noqa: E402
                            finish_distributed, load_config, parse_with_local_rank)


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
    add_cfg_options_and_launcher(parser)
    return parse_with_local_rank(parser)


def main():
    args = parse_args()
    cfg = load_config(args)

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

    # start training
    build_runner(cfg).train()
    finish_distributed()


if __name__ == '__main__':
    main()
