"""Build a small, deterministic COCO-format detection dataset from real handwritten digits.

The source is scikit-learn's bundled ``load_digits`` (1,797 real 8x8
handwritten digits, 16 grey levels; no download). Each canvas holds several
digits, upscaled to different sizes and aspect ratios, inked in different
colours, at random non-overlapping positions, over a cluttered background
(colour gradient, noise, random strokes, rectangles and blobs that look a
little like ink). The ten classes are the digits ``'0'`` ... ``'9'``; each box
is the tight box of the digit's visible ink.

Train and val are split **by source digit**: every one of the 1,797 source
images belongs to exactly one split (a stratified 80/20 draw, per class), and
a split's canvases only use its own digits. Every annotation records its
source in ``digit_index``.

Output (default ``data/digits_det/``)::

    annotations/train.json   annotations/val.json   (COCO: images, annotations, categories)
    train/000000.png ...     val/000000.png ...

The same arguments always give byte-identical files: the random draws come
from ``numpy.random.default_rng`` seeded by (seed, split, image index), PNGs
are written by PIL without timestamps, the json with sorted keys.

Run: ``python tools/make_digits_det.py [--out DIR] [--num-train N] [--num-val N]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = tuple(str(d) for d in range(10))
SPLITS = ('train', 'val')
FORMAT_VERSION = 1


def split_sources(targets: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Source-digit indices of each split: a stratified draw, disjoint by construction."""
    rng = np.random.default_rng([seed, 99])
    val = []
    for cls in range(10):
        idx = np.flatnonzero(targets == cls)
        idx = idx[rng.permutation(len(idx))]
        val.extend(idx[:int(round(val_fraction * len(idx)))].tolist())
    val = np.array(sorted(val), dtype=np.int64)
    train = np.setdiff1d(np.arange(len(targets)), val)
    return dict(train=train, val=val)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colour gradient plus noise, float32 HxWx3 in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0.25, 0.95, 3), rng.uniform(0.25, 0.95, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, rng.uniform(0.01, 0.06), img.shape)
    return img.astype(np.float32)


def _clutter(img: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Paint strokes, rectangle outlines and blobs in place (distractors, no boxes)."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(count):
        colour = rng.uniform(0, 1, 3)
        strength = rng.uniform(0.3, 0.9)
        kind = rng.integers(3)
        if kind == 0:  # a straight stroke, 1-3 px wide
            x0, y0, x1, y1 = rng.uniform(0, size, 4)
            width = rng.uniform(0.7, 1.8)
            dx, dy = x1 - x0, y1 - y0
            length2 = max(dx * dx + dy * dy, 1e-6)
            t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / length2, 0, 1)
            dist = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
            alpha = np.clip(width + 0.5 - dist, 0, 1)
        elif kind == 1:  # a rectangle outline
            x0, y0 = rng.uniform(0, size * 0.8, 2)
            w, h = rng.uniform(size * 0.08, size * 0.4, 2)
            inside = (xx >= x0) & (xx <= x0 + w) & (yy >= y0) & (yy <= y0 + h)
            inner = ((xx >= x0 + 1.5) & (xx <= x0 + w - 1.5)
                     & (yy >= y0 + 1.5) & (yy <= y0 + h - 1.5))
            alpha = (inside & ~inner).astype(np.float32)
        else:  # a soft blob
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(size * 0.02, size * 0.08)
            alpha = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        alpha = (strength * alpha)[..., None]
        img *= 1 - alpha
        img += alpha * colour


def _upscale(digit: np.ndarray, width: int, height: int) -> np.ndarray:
    """8x8 grey levels 0..16 to a (height, width) alpha mask in [0, 1] (bilinear)."""
    src = Image.fromarray((digit / 16.0).astype(np.float32), mode='F')
    return np.asarray(src.resize((width, height), Image.BILINEAR), dtype=np.float32).clip(0, 1)


def _overlap(a, b) -> float:
    """Intersection over the smaller box, boxes as (x0, y0, x1, y1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def render_canvas(rng: np.random.Generator, images: np.ndarray, sources: np.ndarray,
                  size: int, digits_per_image: tuple[int, int], digit_size: tuple[int, int],
                  clutter: tuple[int, int], ink_threshold: float = 0.25):
    """One canvas: uint8 HxWx3 and a list of (source index, (x0, y0, x1, y1)) boxes."""
    img = _background(rng, size)
    _clutter(img, rng, int(rng.integers(clutter[0], clutter[1] + 1)))
    placed = []
    wanted = int(rng.integers(digits_per_image[0], digits_per_image[1] + 1))
    for _ in range(wanted):
        source = int(sources[rng.integers(len(sources))])
        height = int(rng.integers(digit_size[0], digit_size[1] + 1))
        width = max(6, int(round(height * rng.uniform(0.7, 1.2))))
        alpha = _upscale(images[source], width, height)
        ys, xs = np.nonzero(alpha > ink_threshold)
        if len(xs) == 0:
            continue
        for _attempt in range(30):
            ox = int(rng.integers(0, size - width + 1))
            oy = int(rng.integers(0, size - height + 1))
            box = (ox + xs.min(), oy + ys.min(), ox + xs.max() + 1, oy + ys.max() + 1)
            if all(_overlap(box, other) < 0.05 for _, other in placed):
                break
        else:
            continue
        # Ink with clear contrast against the local background.
        local = img[oy:oy + height, ox:ox + width].mean(axis=(0, 1))
        ink = rng.uniform(0, 1, 3)
        while np.abs(ink - local).mean() < 0.35:
            ink = rng.uniform(0, 1, 3)
        a = (alpha * rng.uniform(0.8, 1.0))[..., None]
        region = img[oy:oy + height, ox:ox + width]
        region *= 1 - a
        region += a * ink
        placed.append((source, tuple(float(v) for v in box)))
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), placed


def build(out: str | Path = 'data/digits_det', num_train: int = 1600, num_val: int = 300,
          size: int = 128, seed: int = 0, val_fraction: float = 0.2,
          digits_per_image: tuple[int, int] = (3, 6), digit_size: tuple[int, int] = (16, 40),
          clutter: tuple[int, int] = (3, 8)) -> dict:
    """Write the dataset under ``out``; return its paths and counts."""
    from sklearn.datasets import load_digits
    data = load_digits()
    images, targets = data.images, data.target.astype(np.int64)
    sources = split_sources(targets, val_fraction, seed)
    out = Path(out)
    (out / 'annotations').mkdir(parents=True, exist_ok=True)
    categories = [dict(id=d + 1, name=str(d), supercategory='digit') for d in range(10)]
    summary = dict(root=str(out), classes=CLASSES)
    for split_id, (split, count) in enumerate((('train', num_train), ('val', num_val))):
        (out / split).mkdir(exist_ok=True)
        coco_images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_id, i])
            pixels, boxes = render_canvas(rng, images, sources[split], size, digits_per_image,
                                          digit_size, clutter)
            name = f'{i:06d}.png'
            Image.fromarray(pixels, mode='RGB').save(out / split / name, format='PNG',
                                                     optimize=False, compress_level=6)
            coco_images.append(dict(id=i + 1, file_name=name, width=size, height=size))
            for source, (x0, y0, x1, y1) in boxes:
                w, h = x1 - x0, y1 - y0
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=i + 1,
                    category_id=int(targets[source]) + 1,
                    bbox=[x0, y0, w, h], area=w * h, iscrowd=0,
                    segmentation=[[x0, y0, x1, y0, x1, y1, x0, y1]],
                    digit_index=source))
        coco = dict(
            info=dict(description='handwritten digits (sklearn load_digits) on cluttered canvases',
                      version=FORMAT_VERSION, seed=seed, split=split,
                      source_digits=len(sources[split])),
            licenses=[], images=coco_images, annotations=annotations, categories=categories)
        ann_file = out / 'annotations' / f'{split}.json'
        ann_file.write_text(json.dumps(coco, sort_keys=True, separators=(',', ':')) + '\n')
        summary[split] = dict(ann_file=str(ann_file), img_dir=str(out / split),
                              images=count, boxes=len(annotations),
                              source_digits=len(sources[split]))
    return summary


def ensure(root: str | Path, num_train: int = 1600, num_val: int = 300, size: int = 128,
           seed: int = 0, digits: tuple[int, int] = (3, 6),
           digit_px: tuple[int, int] = (16, 40), clutter: tuple[int, int] = (3, 8)) -> Path:
    """The set these arguments describe, under ``root/<size>px_<hash>/``; written unless a
    set with the same arguments (and generator version) is already there.

    The directory name holds a hash of the arguments and ``manifest.json`` beside the data
    holds the arguments themselves, so sets of other arguments live side by side (the demo
    and the small-batch detection study share them)."""
    key = dict(size=size, num_train=num_train, num_val=num_val, digits=list(digits),
               digit_px=list(digit_px), clutter=list(clutter), seed=seed,
               version=FORMAT_VERSION)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    out = Path(root) / f'{size}px_{digest}'
    manifest = out / 'manifest.json'
    if manifest.is_file() and json.loads(manifest.read_text()) == key:
        return out
    build(out, num_train=num_train, num_val=num_val, size=size, seed=seed,
          digits_per_image=tuple(digits), digit_size=tuple(digit_px), clutter=tuple(clutter))
    manifest.write_text(json.dumps(key, sort_keys=True) + '\n')
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/digits_det', help='output directory')
    parser.add_argument('--num-train', type=int, default=1600, help='train canvases')
    parser.add_argument('--num-val', type=int, default=300, help='val canvases')
    parser.add_argument('--size', type=int, default=128, help='canvas side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--val-fraction', type=float, default=0.2,
                        help='fraction of the source digits (per class) kept for val')
    args = parser.parse_args(argv)
    s = build(args.out, args.num_train, args.num_val, args.size, args.seed, args.val_fraction)
    for split in SPLITS:
        print(f'{split}: {s[split]["images"]} images, {s[split]["boxes"]} boxes from '
              f'{s[split]["source_digits"]} source digits -> {s[split]["ann_file"]}')


if __name__ == '__main__':
    main()
