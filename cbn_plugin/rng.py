"""Random number generator states as weights_only-safe plain data.

``PreciseCBNHook`` puts the process's states back after its pass, so training
draws the same numbers as without it; the checkpoint kit
(:mod:`cbn_plugin.engine`) saves each rank's :func:`get_rng_state` with a
checkpoint and restores it when the run resumes (``docs/checkpoints.md``,
Exact resume).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from mmengine.dist import get_world_size

RNG_KEY = 'rng_state'
RNG_FORMAT = 1


def get_rng_state() -> dict:
    """This process's random number generator states, as weights_only-safe plain data.

    Python's ``random``, NumPy's global ``RandomState``, torch's CPU
    generator and, when CUDA is initialised, every CUDA device's generator.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        'format': RNG_FORMAT,
        'world_size': get_world_size(),
        'torch': torch.get_rng_state(),
        'numpy': {'kind': str(kind), 'keys': torch.from_numpy(keys.astype(np.int64)),
                  'pos': int(pos), 'has_gauss': int(has_gauss),
                  'cached_gaussian': float(cached_gaussian)},
        'random': {'version': int(version), 'internal': torch.tensor(internal, dtype=torch.int64),
                   'gauss_next': None if gauss_next is None else float(gauss_next)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> list[str]:
    """Restore what :func:`get_rng_state` returned; returns the generators restored.

    CUDA states are restored for the devices both the state and this process
    have (a CPU-only process skips them).
    """
    if state.get('format') != RNG_FORMAT:
        raise ValueError(f'RNG state of format {state.get("format")!r}; this version of '
                         f'cbn_plugin reads format {RNG_FORMAT}')
    torch.set_rng_state(state['torch'])
    npy = state['numpy']
    np.random.set_state((npy['kind'], npy['keys'].numpy().astype(np.uint32), npy['pos'],
                         npy['has_gauss'], npy['cached_gaussian']))
    rnd = state['random']
    random.setstate((rnd['version'], tuple(rnd['internal'].tolist()), rnd['gauss_next']))
    restored = ['torch', 'numpy', 'random']
    cuda = state.get('cuda') or []
    if cuda and torch.cuda.is_available():
        for device in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[device], device)
        restored.append(f'cuda x{min(len(cuda), torch.cuda.device_count())}')
    return restored
