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

For the tests that run the real tools on it: :func:`derived_config` (the text
of a config whose ``_base_`` is a real config, shrunk to this set on CPU),
:func:`train_records`/:func:`scalars` (the training records of
``vis_data/scalars.json``), :func:`coco_map` (the mAP numbers in a log) and
:func:`recomputed_map` (the same numbers, recomputed from dumped predictions).
"""
from __future__ import annotations

import json
import math
import re
import textwrap
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


# The real model, with no pretrained weights (no network) and proposals and
# samples cut for CPU: the default ``model`` of :func:`derived_config`.
SHRUNK_MODEL = """\
model = dict(
    backbone=dict(init_cfg=None),
    roi_head=dict(bbox_roi_extractor=dict(roi_layer=dict(sampling_ratio=2)),
                  bbox_head=dict(num_classes=2)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=100, max_per_img=100),
                   rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=100, max_per_img=100),
                  rcnn=dict(max_per_img=20)))
"""


# The real layout (CBN in the FPN and the 4conv1fc head), narrow: R18 at 16 base
# channels, 32-channel FPN and head, for 64 px images (the resume tests).
NARROW_MODEL = """\
model = dict(
    backbone=dict(depth=18, base_channels=16, init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32, roi_layer=dict(sampling_ratio=2)),
        bbox_head=dict(in_channels=32, conv_out_channels=32, fc_out_channels=64,
                       num_classes=2)),
    train_cfg=dict(rpn=dict(sampler=dict(num=64)),
                   rpn_proposal=dict(nms_pre=100, max_per_img=100),
                   rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(rpn=dict(nms_pre=100, max_per_img=100), rcnn=dict(max_per_img=20)))
"""


def narrow_config(base, data: dict, extra: str = '') -> str:
    """:func:`derived_config` at 64 px with :data:`NARROW_MODEL`, validating on 2 images."""
    return derived_config(base, data, image=64, val_indices=2, model=NARROW_MODEL, extra=extra)


def derived_config(base, data: dict, image: int = 128, mask: bool = False,
                   val_indices: int | None = None, model: str = SHRUNK_MODEL,
                   extra: str = '') -> str:
    """The text of a config that shrinks the real config ``base`` to the set ``data``.

    ``_base_`` is ``base``; the file sets ``data_root``, ``metainfo`` (the two
    classes), the train and test pipelines (``Resize`` to ``image`` x
    ``image``, masks loaded when ``mask``), the dataloaders (batch 2, no
    worker processes; validation and test on the first ``val_indices`` images
    when given) and the COCO evaluators (``bbox``, and ``segm`` when
    ``mask``). Then ``model`` (config lines; a 2-class mask head is added when
    ``mask``) and ``extra`` (dedented: schedule, hooks, randomness, imports).
    ``data`` is what :func:`write_tiny_coco` returns.
    """
    root = data['root'].rstrip('/') + '/'
    with_mask = ', with_mask=True' if mask else ''
    metric = "['bbox', 'segm']" if mask else "'bbox'"
    indices = f', indices={val_indices!r}' if val_indices is not None else ''
    text = textwrap.dedent(f"""\
        _base_ = {str(base)!r}
        data_root = {root!r}
        metainfo = dict(classes={tuple(data['classes'])!r},
                        palette=[(220, 20, 60), (0, 0, 142)])
        train_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True{with_mask}),
            dict(type='Resize', scale=({image}, {image}), keep_ratio=True),
            dict(type='RandomFlip', prob=0.5),
            dict(type='PackDetInputs'),
        ]
        test_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=({image}, {image}), keep_ratio=True),
            dict(type='LoadAnnotations', with_bbox=True{with_mask}),
            dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                                  'img_shape', 'scale_factor')),
        ]
        dataset = dict(data_root=data_root, metainfo=metainfo, ann_file={data['ann_file']!r},
                       data_prefix=dict(img={data['img_prefix']!r}))
        train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                                dataset=dict(dataset, pipeline=train_pipeline))
        val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                              dataset=dict(dataset, pipeline=test_pipeline{indices}))
        test_dataloader = val_dataloader
        val_evaluator = dict(ann_file=data_root + {data['ann_file']!r}, metric={metric})
        test_evaluator = val_evaluator
    """) + textwrap.dedent(model)
    if mask:
        text += ("model['roi_head'].update(mask_head=dict(num_classes=2), "
                 "mask_roi_extractor=dict(roi_layer=dict(sampling_ratio=2)))\n")
    return text + textwrap.dedent(extra)


def train_records(path) -> list[dict]:
    """The training records (one per logged iteration) of one ``scalars.json``."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return [r for r in records if 'loss' in r]


def scalars(work_dir) -> list[dict]:
    """Training records of every run in ``work_dir`` (``*/vis_data/scalars.json``, in order)."""
    return [r for path in sorted(Path(work_dir).glob('*/vis_data/scalars.json'))
            for r in train_records(path)]


def coco_map(log: str, kind: str = 'bbox') -> str:
    """The last ``<kind>_mAP_copypaste`` numbers mmdet's CocoMetric printed in ``log``."""
    found = re.findall(rf'{kind}_mAP_copypaste: ([-0-9. ]+)', log)
    assert found, f'no COCO {kind} mAP in the log:\n{log[-3000:]}'
    return found[-1].strip()


def recomputed_map(predictions: list, data: dict) -> str:
    """The COCO bbox mAP of ``predictions`` recomputed here, as :func:`coco_map` reads it.

    ``predictions``: what mmdet's ``DumpDetResults`` writes (``tools/test.py
    --out``): one dict per image with ``img_id`` and ``pred_instances``
    (``bboxes`` x1 y1 x2 y2 in the original image, ``scores``, ``labels``).
    They are converted here (label ``i`` is the category named
    ``data['classes'][i]`` in the annotation file; boxes to x y w h) and
    evaluated by pycocotools' ``COCOeval`` with its default parameters against
    the annotation file of ``data`` (every image in it, as mmdet's
    ``CocoMetric`` does). mmdet evaluates with ``maxDets`` (100, 300, 1000),
    pycocotools' default summary uses 100: the same numbers with at most 100
    detections per image (checked). Returns the six summary APs as mmdet's
    ``bbox_mAP_copypaste`` line prints them (3 decimals).
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(str(Path(data['root']) / data['ann_file']))
        category = {c['name']: c['id'] for c in gt.loadCats(gt.getCatIds())}
        category_of = [category[name] for name in data['classes']]
        detections = []
        for sample in predictions:
            pred = sample['pred_instances']
            boxes, scores = pred['bboxes'].tolist(), pred['scores'].tolist()
            assert len(boxes) <= 100, len(boxes)
            for (x1, y1, x2, y2), score, label in zip(boxes, scores, pred['labels'].tolist()):
                detections.append(dict(image_id=sample['img_id'], bbox=[x1, y1, x2 - x1, y2 - y1],
                                       score=score, category_id=category_of[label]))
        assert detections, 'no detections to evaluate'
        evaluation = COCOeval(gt, gt.loadRes(detections), 'bbox')
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return ' '.join(f'{v:.3f}' for v in evaluation.stats[:6])


if __name__ == '__main__':
    import sys
    print(write_tiny_coco(sys.argv[1] if len(sys.argv) > 1 else 'data/tiny_coco'))
