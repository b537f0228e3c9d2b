"""The study's data: scikit-learn's 8x8 handwritten digits, one fixed split, three tasks."""
from __future__ import annotations

import numpy as np
import torch

_DATA: dict = {}


def load_task(task: str):
    """``(x_train, y_train, x_test, y_test)``: N x 1 x H x W float32, int64 labels.

    scikit-learn's 1,797 real 8x8 handwritten digits, one fixed stratified split
    (1,078 train / 719 test). ``'raw'``: the 8x8 images. ``'lowres'``: the same images
    at a quarter of the pixels (2x2 average pooling to 4x4), the harder task of the study.
    ``'shift5'`` (the second setting): each digit at a random offset (0-2 pixels down and
    right, fixed per image) on a 10x10 canvas, then 2x2 average pooling to 5x5: the
    pooling grid cuts every digit differently. All are standardised with the training
    set's pixel mean and std.
    """
    if task in _DATA:
        return _DATA[task]
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(labels)), test_size=0.4,
                                      stratify=labels, random_state=0)
    if task == 'raw':
        canvas = images
    elif task == 'lowres':
        canvas = images.reshape(-1, 4, 2, 4, 2).mean((2, 4))
    elif task == 'shift5':
        offsets = np.random.default_rng(0).integers(0, 3, size=(len(images), 2))
        big = np.zeros((len(images), 10, 10), np.float32)
        for i, (dy, dx) in enumerate(offsets):
            big[i, dy:dy + 8, dx:dx + 8] = images[i]
        canvas = big.reshape(-1, 5, 2, 5, 2).mean((2, 4))
    else:
        raise ValueError(f'unknown task {task!r}')
    x = torch.from_numpy(np.ascontiguousarray(canvas)).unsqueeze(1)
    x = (x - x[idx_tr].mean()) / x[idx_tr].std()
    y = torch.from_numpy(labels)
    _DATA[task] = (x[idx_tr], y[idx_tr], x[idx_te], y[idx_te])
    return _DATA[task]
