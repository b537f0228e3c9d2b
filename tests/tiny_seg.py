"""Write a tiny, deterministic semantic-segmentation set for tests (MMSegmentation layout).

Each image is dim grey noise with 2-3 filled shapes, at least one of each kind:
rectangles (class 1) in reddish colours and ellipses (class 2) in bluish ones,
drawn in order, so a later shape covers an earlier one in the image and in the
label map alike.
Label maps are single-channel PNGs: 0 background, 1 rectangle, 2 ellipse.
Layout, as MMSegmentation's ``BaseSegDataset`` reads it
(``data_prefix=dict(img_path='img_dir/<split>', seg_map_path='ann_dir/<split>')``,
``img_suffix='.png'``, ``seg_map_suffix='.png'``)::

    root/img_dir/train/000000.png   root/ann_dir/train/000000.png
    root/img_dir/val/...            root/ann_dir/val/...

The same seed and arguments always give byte-identical files. Run as a script
to write one: ``python tests/tiny_seg.py OUT_DIR``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ('background', 'rectangle', 'ellipse')
PALETTE = [(0, 0, 0), (220, 20, 60), (0, 0, 142)]


def _image(rng: np.random.Generator, size: int, shapes: tuple[int, int]):
    img = rng.integers(60, 120, size=(size, size, 3), dtype=np.uint8)
    label = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    # One shape of each class first (in random order), so both are always present.
    classes = [1, 2] if rng.integers(0, 2) else [2, 1]
    classes += [int(rng.integers(1, 3)) for _ in range(int(rng.integers(*shapes) + 1) - 2)]
    for cls in classes:
        h, w = (int(v) for v in rng.integers(size // 5, size // 2, size=2))
        y0, x0 = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
        if cls == 1:
            inside = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            colour = (rng.integers(170, 256), rng.integers(0, 90), rng.integers(0, 90))
        else:
            cy, cx = y0 + h / 2, x0 + w / 2
            inside = ((yy + 0.5 - cy) / (h / 2)) ** 2 + ((xx + 0.5 - cx) / (w / 2)) ** 2 <= 1
            colour = (rng.integers(0, 90), rng.integers(0, 90), rng.integers(170, 256))
        img[inside] = np.asarray(colour, np.uint8)
        label[inside] = cls
    return img, label


def write_tiny_seg(root, num_train: int = 8, num_val: int = 4, size: int = 64, seed: int = 0,
                   shapes: tuple[int, int] = (2, 3)) -> dict:
    """Write ``num_train`` + ``num_val`` image/label pairs of ``size`` x ``size`` under ``root``.

    Each image has ``shapes`` (inclusive range, at least 2) shapes, one of each class first.

    Returns ``root``, ``classes``, ``palette`` and the pixel count of each class in
    the val split (``val_pixels``, to tell a trained model from a constant one).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    val_pixels = np.zeros(len(CLASSES), np.int64)
    for split, count in (('train', num_train), ('val', num_val)):
        (root / 'img_dir' / split).mkdir(parents=True, exist_ok=True)
        (root / 'ann_dir' / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, label = _image(rng, size, shapes)
            Image.fromarray(img).save(root / 'img_dir' / split / f'{i:06d}.png', format='PNG')
            Image.fromarray(label).save(root / 'ann_dir' / split / f'{i:06d}.png', format='PNG')
            if split == 'val':
                val_pixels += np.bincount(label.ravel(), minlength=len(CLASSES))
    return dict(root=str(root), classes=CLASSES, palette=PALETTE,
                val_pixels=val_pixels.tolist(), size=size)


if __name__ == '__main__':
    import sys
    print(write_tiny_seg(sys.argv[1] if len(sys.argv) > 1 else 'data/tiny_seg'))
