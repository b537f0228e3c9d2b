"""The seed of a resumed run: the checkpoint's, when the config sets none.

MMEngine gives the train sampler and the data-loading workers the Runner's
seed before ``Runner.resume`` reads the checkpoint's, so a resumed run without
``randomness.seed`` shuffles with a new one. :func:`adopt_checkpoint_seed`,
called before the Runner is built (``build_runner`` in ``tools/launch_support.py``),
fixes that. See ``docs/checkpoints.md`` (Exact resume).
"""
from __future__ import annotations

import logging

import torch
from mmengine.logging import print_log

from .codec import decode
from .files import CheckpointFileError, check_checkpoint_file, checkpoint_to_resume, is_local_path


def read_checkpoint_meta(path) -> dict:
    """``meta`` of a checkpoint file, decoded; the tensors are memory-mapped, not read."""
    try:
        checkpoint = torch.load(path, map_location='cpu', mmap=True)
    except RuntimeError:  # torch's pre-1.6 format cannot be memory-mapped
        checkpoint = torch.load(path, map_location='cpu')
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    return decode(meta) if isinstance(meta, dict) else {}


def adopt_checkpoint_seed(cfg) -> int | None:
    """Make a resumed run use the seed of the run it resumes; returns the seed adopted.

    With no ``randomness.seed`` in the config (MMDetection's default), MMEngine
    draws a seed in ``Runner.__init__`` and gives it, when the dataloaders are
    built, to the train sampler (the shuffle of every epoch) and to the
    data-loading workers (``worker_init_fn``). ``Runner.resume`` reads the
    checkpoint's seed only after that, so a resumed run shuffles the rest of
    training with another seed. Called before the Runner is built (by the
    tools, through ``build_runner`` in ``tools/launch_support.py``), this sets
    ``cfg.randomness.seed`` to ``checkpoint['meta']['seed']`` when the config
    resumes (``cfg.resume``) and sets no seed itself; the Runner is then
    seeded exactly like the run it continues.

    A configured seed is kept; when it differs from the checkpoint's a
    warning says that the data order then differs. Nothing is adopted (with a
    warning) for a remote checkpoint or one without a seed; a missing or
    damaged file is left for the Runner to report by name.
    """
    if not cfg.get('resume', False):
        return None
    path, source = checkpoint_to_resume(True, cfg.get('load_from', None), cfg.work_dir)
    if path is None:
        return None
    randomness = dict(cfg.get('randomness', None) or {})
    configured = randomness.get('seed', None)
    if not is_local_path(path):
        if configured is None:
            print_log(f'adopt_checkpoint_seed: cannot read the seed of the remote checkpoint '
                      f'{path}{source}; the resumed run draws a new seed, so its data order '
                      'differs from the uninterrupted run. Set randomness.seed to the seed '
                      "logged by the first run for an exact resume", logger='current',
                      level=logging.WARNING)
        return None
    try:
        check_checkpoint_file(path, crc=False, note=source)
    except (FileNotFoundError, CheckpointFileError):
        return None  # WeightsOnlyCheckpointHook (or MMEngine) reports it when loading
    seed = read_checkpoint_meta(path).get('seed', None)
    if seed is None:
        print_log(f'adopt_checkpoint_seed: checkpoint {path}{source} records no seed (not '
                  'written by an MMEngine Runner?); the resumed run uses '
                  f'{"its configured seed" if configured is not None else "a new seed"}',
                  logger='current', level=logging.WARNING)
        return None
    if configured is not None:
        if int(configured) != int(seed):
            print_log(f'adopt_checkpoint_seed: randomness.seed={configured} but checkpoint '
                      f'{path}{source} was written by a run seeded with {seed}: the resumed '
                      'run shuffles its data (and seeds its workers) with the configured seed, '
                      'unlike the run it continues', logger='current', level=logging.WARNING)
        return None
    randomness['seed'] = int(seed)
    cfg.randomness = randomness
    print_log(f'adopt_checkpoint_seed: adopted seed {seed} from checkpoint {path}{source} '
              '(the config sets no randomness.seed)', logger='current')
    return int(seed)

