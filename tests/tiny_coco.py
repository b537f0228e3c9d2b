"""Write a tiny, deterministic COCO-format detection dataset for tests.

Each image is uniform noise with a few filled rectangles and ellipses in
random colours. Annotations carry everything MMDetection's ``CocoDataset``
and pycocotools read: ``bbox`` (x, y, w, h), ``area`` (the polygon's area),
``iscrowd`` 0, ``category_id`` and a ``segmentation`` polygon (so Mask R-CNN
configs can use the same data). Usage::

    from tiny_coco import write_tiny_coco
    info = write_tiny_coco(tmp_path / 'coco', num_images=4, seed=0)
    # info['ann_file'] == 'annotations/instances.json' (relative to root),
    # info['img_prefix'] == 'images/', info['classes'] == ('rectangle', 'ellipse')

The same ``seed`` and arguments always give byte-identical files.
Run as a script to write one: ``python tests/tiny_coco.py OUT_DIR``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ('rectangle', 'ellipse')
ELLIPSE_VERTICES = 16


def _polygon_area(xs: np.ndarray, ys: np.ndarray) -> float:
    """Shoelace area of a closed polygon."""
    return float(0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def _draw_shape(img: np.ndarray, rng: np.random.Generator, kind: str, min_size: int):
    """Paint one shape in place; return (bbox, polygon) in pixel coordinates."""
    h, w = img.shape[:2]
    bw = int(rng.integers(min_size, max(min_size + 1, w // 2)))
    bh = int(rng.integers(min_size, max(min_size + 1, h // 2)))
    x0 = int(rng.integers(0, w - bw))
    y0 = int(rng.integers(0, h - bh))
    colour = rng.integers(0, 256, size=3, dtype=np.uint8)
    if kind == 'rectangle':
        img[y0:y0 + bh, x0:x0 + bw] = colour
        # Pixel (x, y) covers [x, x+1): the filled block spans [x0, x0+bw).
        poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
    else:
        cx, cy, a, b = x0 + bw / 2, y0 + bh / 2, bw / 2, bh / 2
        yy, xx = np.mgrid[0:h, 0:w]
        inside = ((xx + 0.5 - cx) / a) ** 2 + ((yy + 0.5 - cy) / b) ** 2 <= 1.0
        img[inside] = colour
        angles = np.arange(ELLIPSE_VERTICES) * (2 * math.pi / ELLIPSE_VERTICES)
        poly = np.stack([cx + a * np.cos(angles), cy + b * np.sin(angles)], 1)
        poly = [round(float(v), 2) for v in poly.reshape(-1)]
    bbox = [float(x0), float(y0), float(bw), float(bh)]
    return bbox, poly


def write_tiny_coco(root, num_images: int = 4, seed: int = 0, image_size=(96, 128),
                    shapes_per_image=(1, 3), min_size: int = 12,
                    ann_name: str = 'instances.json', img_dir: str = 'images') -> dict:
    """Write ``num_images`` PNGs and one COCO instances json under ``root``.

    Args:
        root: output directory (created).
        num_images: images to write.
        seed: everything (noise, shapes, colours, sizes) follows from it.
        image_size: ``(height, width)`` of every image.
        shapes_per_image: inclusive range of objects per image.
        min_size: smallest box side in pixels.
        ann_name: file name of the json under ``root/annotations``.
        img_dir: image folder under ``root``.

    Returns a dict with ``root``, ``ann_file`` and ``img_prefix`` (both
    relative to ``root``, as mmdet's ``data_root``/``ann_file``/
    ``data_prefix=dict(img=...)`` expect), ``classes``, ``num_images`` and
    ``num_annotations``.
    """
    root = Path(root)
    (root / img_dir).mkdir(parents=True, exist_ok=True)
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = image_size
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        file_name = f'{image_id:06d}.png'
        lo, hi = shapes_per_image
        for _ in range(int(rng.integers(lo, hi + 1))):
            category = int(rng.integers(0, len(CLASSES)))
            bbox, poly = _draw_shape(img, rng, CLASSES[category], min_size)
            xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=category + 1,
                bbox=bbox, area=round(_polygon_area(xs, ys), 2), iscrowd=0,
                segmentation=[poly]))
        Image.fromarray(img).save(root / img_dir / file_name, format='PNG')
        images.append(dict(id=image_id, file_name=file_name, height=h, width=w))
    coco = dict(
        info=dict(description=f'tiny synthetic COCO (seed {seed})', version='1.0'),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(CLASSES)])
    with open(root / 'annotations' / ann_name, 'w') as f:
        json.dump(coco, f, indent=1, sort_keys=True)
    return dict(root=str(root), ann_file=f'annotations/{ann_name}', img_prefix=f'{img_dir}/',
                classes=CLASSES, num_images=num_images, num_annotations=len(annotations))


if __name__ == '__main__':
    import sys
    print(write_tiny_coco(sys.argv[1] if len(sys.argv) > 1 else 'data/tiny_coco'))
