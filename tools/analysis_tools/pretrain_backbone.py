"""Pretrain the digits detector's backbone as a digit classifier: the "ImageNet weights" of
the pretrained-backbone study, made here from the detection set's own generator.

The backbone is the detector's (``configs/small_batch_det/``: ResNet-18 layout, width
``--width``) with BN or GN (``--norm``), trained as a 10-way classifier (global average
pool + one linear layer) on crops drawn by ``tools/make_digits_det.py``'s canvas renderer:
one handwritten digit of the detection size range on a cluttered background, the label
being the digit. Only source digits of the detection **train** pool are drawn (the split
``make_digits_det.split_sources`` makes for the detection set's seed); the detection val
digits are never seen. A tenth of the train pool (per class) is held out of pretraining
and gives the accuracy the checkpoint records.

The checkpoint is an ordinary one (``state_dict``: the backbone's keys, no prefix;
``meta``: the recipe, the accuracy, the source digits used, the CPU time), loaded the way
users load ImageNet weights::

    model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=PATH)))

It is cached like the digits data: ``ensure_pretrained`` builds it under
``data/pretrained_backbones/`` only when it is missing or its recipe changed (the file
name holds a hash of the recipe; a manifest beside it holds the recipe itself).

    # BN and its GN twin (same recipe), a few CPU minutes each, one torch thread
    OMP_NUM_THREADS=1 .venv/bin/python tools/analysis_tools/pretrain_backbone.py --norm bn gn
    # seconds: a tiny recipe into another root
    .venv/bin/python tools/analysis_tools/pretrain_backbone.py --tiny --root /tmp/pretrained
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tools'))

import make_digits_det  # noqa: E402

DEFAULT_ROOT = REPO / 'data' / 'pretrained_backbones'
# The detector whose backbone is pretrained: its backbone dict is the model's layout.
DETECTOR_CONFIG = (REPO / 'configs' / 'small_batch_det' /
                   'faster-rcnn_r18-w32_fpn_4conv1fc-bn-all_digits.py')
NORMS = ('bn', 'gn')
OPTIMIZERS = ('adamw', 'sgd')
GN_GROUPS = 8  # as the detection studies' GN
# The detector's data preprocessor (RGB after bgr_to_rgb): crops are normalised alike.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# Everything that decides the weights. A change of any value is another checkpoint.
RECIPE_DEFAULTS = dict(
    norm='bn', width=32, depth=18,
    # data: crops from the detection generator, the detection set's digit split
    crop=48, digit_px=[16, 40], clutter=[1, 3], data_seed=0, val_fraction=0.2,
    holdout_fraction=0.1, images=40000, eval_images=1000,
    # optimisation: AdamW (SGD at lr 0.1 and 0.02 stayed at chance loss for 500 steps on
    # these crops), linear warm-up then cosine decay to 0
    optimizer='adamw', batch=32, lr=2e-3, momentum=0.9, weight_decay=0.05, warmup=0.05,
    seed=0,
    format=1)
TINY_RECIPE = dict(width=8, crop=32, digit_px=[12, 28], images=64, eval_images=32, batch=16)


def check_recipe(recipe: dict) -> dict:
    """``recipe`` completed with the defaults; a clear error for an unknown key or value."""
    unknown = sorted(set(recipe) - set(RECIPE_DEFAULTS))
    if unknown:
        raise ValueError(f'unknown pretraining recipe keys {unknown}; valid: '
                         f'{sorted(RECIPE_DEFAULTS)}')
    r = dict(RECIPE_DEFAULTS, **recipe)
    if r['optimizer'] not in OPTIMIZERS:
        raise ValueError(f'optimizer={r["optimizer"]!r}: valid optimizers are {list(OPTIMIZERS)}')
    if r['norm'] not in NORMS:
        raise ValueError(f'norm={r["norm"]!r}: valid norms are {list(NORMS)}')
    if r['norm'] == 'gn' and r['width'] % GN_GROUPS:
        raise ValueError(f'width={r["width"]}: GN with {GN_GROUPS} groups needs a width '
                         f'divisible by {GN_GROUPS}')
    for key in ('width', 'crop', 'images', 'eval_images', 'batch'):
        if not isinstance(r[key], int) or r[key] < 1:
            raise ValueError(f'{key}={r[key]!r}: must be a positive integer')
    lo, hi = r['digit_px']
    if not 6 <= lo <= hi <= r['crop']:
        raise ValueError(f'digit_px={r["digit_px"]}: need 6 <= min <= max <= crop '
                         f'({r["crop"]})')
    for key in ('val_fraction', 'holdout_fraction'):
        if not 0 < r[key] < 1:
            raise ValueError(f'{key}={r[key]!r}: must be in (0, 1)')
    r['digit_px'], r['clutter'] = list(r['digit_px']), list(r['clutter'])
    return r


def recipe_digest(recipe: dict) -> str:
    return hashlib.sha1(json.dumps(check_recipe(recipe), sort_keys=True).encode()).hexdigest()[:10]


def checkpoint_path(root: Path, recipe: dict) -> Path:
    r = check_recipe(recipe)
    return Path(root) / f'resnet{r["depth"]}-w{r["width"]}-{r["norm"]}_{recipe_digest(r)}.pth'


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def _digits():
    """scikit-learn's 8x8 digits (the detection set's source) and their labels."""
    from sklearn.datasets import load_digits
    data = load_digits()
    return data.images, data.target.astype(np.int64)


def source_pools(recipe: dict) -> dict[str, np.ndarray]:
    """Source-digit indices: ``detection_val`` (never used here), ``pretrain`` and
    ``holdout`` (a per-class draw from the detection train pool, disjoint)."""
    r = check_recipe(recipe)
    targets = _digits()[1]
    split = make_digits_det.split_sources(targets, r['val_fraction'], r['data_seed'])
    rng = np.random.default_rng([r['data_seed'], 4242])
    holdout = []
    for cls in range(10):
        idx = split['train'][targets[split['train']] == cls]
        idx = idx[rng.permutation(len(idx))]
        holdout.extend(idx[:max(1, int(round(r['holdout_fraction'] * len(idx))))].tolist())
    holdout = np.array(sorted(holdout), dtype=np.int64)
    return dict(pretrain=np.setdiff1d(split['train'], holdout), holdout=holdout,
                detection_val=split['val'])


def make_crops(recipe: dict, sources: np.ndarray, count: int, stream: int, start: int = 0):
    """``count`` crops (uint8 N x crop x crop x 3, RGB) of one digit each from ``sources``
    on the detection generator's cluttered background, and their labels and source ids.
    Deterministic: crop ``i`` of ``stream`` (``start`` on) is drawn from its own seeded
    generator, so a training stream is made batch by batch, in order, without storing it."""
    r = check_recipe(recipe)
    images, targets = _digits()
    pixels = np.empty((count, r['crop'], r['crop'], 3), np.uint8)
    labels = np.empty(count, np.int64)
    used = np.empty(count, np.int64)
    for i in range(count):
        rng = np.random.default_rng([r['data_seed'], 77, stream, start + i])
        placed = []
        while not placed:  # a digit with no ink above the threshold is redrawn
            img, placed = make_digits_det.render_canvas(
                rng, images, sources, r['crop'], (1, 1), tuple(r['digit_px']),
                tuple(r['clutter']))
        pixels[i], used[i] = img, placed[0][0]
        labels[i] = targets[used[i]]
    return pixels, labels, used


def to_tensor(pixels: np.ndarray):
    import torch
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- model


def backbone_cfg(width: int, norm: str, depth: int = 18) -> dict:
    """The detector's backbone dict (from its config) at ``width`` with ``norm``."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(DETECTOR_CONFIG)).model.backbone.to_dict()
    cfg.update(depth=depth, base_channels=width, stem_channels=width, init_cfg=None,
               norm_eval=False, frozen_stages=-1)
    cfg['norm_cfg'] = dict(type='BN', requires_grad=True) if norm == 'bn' \
        else dict(type='GN', num_groups=GN_GROUPS, requires_grad=True)
    return cfg


def build_classifier(recipe: dict):
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    r = check_recipe(recipe)
    backbone = MODELS.build(backbone_cfg(r['width'], r['norm'], r['depth']))
    head = torch.nn.Linear(8 * r['width'] * (4 if r['depth'] >= 50 else 1), 10)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, x):
            return self.head(self.backbone(x)[-1].mean((2, 3)))

    return Classifier()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def accuracy(model, x, y, batch: int = 256) -> float:
    import torch
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                      for i in range(0, len(x), batch))
    return correct / len(x)


def pretrain(recipe: dict, log=print) -> tuple[dict, dict]:
    """Train the classifier; return the backbone's state_dict and the meta the checkpoint
    records (recipe, held-out accuracy, loss curve, source digits used, CPU time)."""
    import torch
    r = check_recipe(recipe)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    pools = source_pools(r)
    eval_px, eval_y, eval_src = make_crops(r, pools['holdout'], r['eval_images'], stream=1)
    torch.manual_seed(r['seed'])
    model = build_classifier(r)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # no weight decay on norms and biases
        (no_decay if p.ndim == 1 else decay).append(p)
    groups = [dict(params=decay, weight_decay=r['weight_decay']),
              dict(params=no_decay, weight_decay=0.0)]
    if r['optimizer'] == 'sgd':
        opt = torch.optim.SGD(groups, lr=r['lr'], momentum=r['momentum'])
    else:  # momentum is Adam's beta1
        opt = torch.optim.AdamW(groups, lr=r['lr'], betas=(r['momentum'], 0.999))
    steps = r['images'] // r['batch']
    warm = max(1, round(r['warmup'] * steps))

    def lr_at(step):
        if step < warm:
            return r['lr'] * (step + 1) / warm
        return 0.5 * r['lr'] * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    losses, correct, used = [], 0, set()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group['lr'] = lr_at(step)
        # every crop is new (a fresh draw of digit, size, place, ink and clutter)
        px, labels, src = make_crops(r, pools['pretrain'], r['batch'], stream=0,
                                     start=step * r['batch'])
        used.update(src.tolist())
        y = torch.from_numpy(labels)
        out = model(to_tensor(px))
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        correct += int((out.argmax(1) == y).sum())
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f'  {r["norm"]} step {step + 1}/{steps} loss '
                f'{sum(losses[-max(1, steps // 10):]) / max(1, min(len(losses), steps // 10)):.3f}'
                f' lr {lr_at(step):.4f}')
    tail = losses[-max(1, steps // 10):]
    meta = dict(recipe=r, digest=recipe_digest(r),
                holdout_accuracy=accuracy(model, to_tensor(eval_px), torch.from_numpy(eval_y)),
                final_train_loss=sum(tail) / len(tail),
                train_accuracy_while_training=correct / max(1, steps * r['batch']),
                loss_curve=[sum(losses[i:i + max(1, steps // 20)]) / len(
                    losses[i:i + max(1, steps // 20)]) for i in range(0, steps, max(1, steps // 20))],
                steps=steps, sources_used=sorted(used),
                holdout_sources=sorted(set(eval_src.tolist())), wall_s=time.perf_counter() - wall0,
                cpu_s=_cpu_seconds() - cpu0, torch=str(torch.__version__),
                when=time.strftime('%Y-%m-%d %H:%M'))
    return model.backbone.state_dict(), meta


def ensure_pretrained(recipe: dict, root: Path = DEFAULT_ROOT, log=print) -> Path:
    """The checkpoint of ``recipe`` under ``root``, trained only if it is missing or its
    manifest records another recipe."""
    import torch
    r = check_recipe(recipe)
    path = checkpoint_path(root, r)
    manifest = path.with_suffix('.json')
    if path.is_file() and manifest.is_file() and json.loads(manifest.read_text()).get(
            'recipe') == r:
        return path
    if log:
        log(f'pretraining the {r["norm"].upper()} backbone (w{r["width"]}, {r["images"]} '
            f'crops) -> {path}')
    state, meta = pretrain(r, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.pth.tmp')
    torch.save(dict(state_dict=state, meta=meta), tmp)
    tmp.replace(path)  # a crash mid-save leaves no checkpoint that looks complete
    manifest.write_text(json.dumps({k: v for k, v in meta.items()
                                    if k not in ('sources_used', 'holdout_sources')},
                                   indent=1, sort_keys=True) + '\n')
    if log:
        log(f'  held-out accuracy {meta["holdout_accuracy"]:.3f}, {meta["cpu_s"]:.0f} s CPU')
    return path


def read_meta(path: Path) -> dict:
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)['meta']


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n', 1)[1])
    ap.add_argument('--norm', nargs='+', choices=NORMS, default=['bn', 'gn'])
    ap.add_argument('--root', type=Path, default=DEFAULT_ROOT)
    ap.add_argument('--tiny', action='store_true', help='a tiny recipe: seconds')
    for key, value in RECIPE_DEFAULTS.items():
        if key in ('norm', 'format'):
            continue
        flag = '--' + key.replace('_', '-')
        if isinstance(value, list):
            ap.add_argument(flag, type=int, nargs=2, default=None)
        elif key == 'optimizer':
            ap.add_argument(flag, choices=OPTIMIZERS, default=None)
        else:
            ap.add_argument(flag, type=type(value), default=None)
    return ap.parse_args(argv)


def recipe_from_args(args, norm: str) -> dict:
    recipe = dict(TINY_RECIPE) if args.tiny else {}
    for key in RECIPE_DEFAULTS:
        value = getattr(args, key, None)
        if key != 'norm' and value is not None:
            recipe[key] = list(value) if isinstance(value, (list, tuple)) else value
    return check_recipe(dict(recipe, norm=norm))


def main(argv=None):
    import torch
    torch.set_num_threads(1)
    args = parse_args(argv)
    paths = {}
    for norm in args.norm:
        path = ensure_pretrained(recipe_from_args(args, norm), args.root)
        meta = read_meta(path)
        print(f'{norm}: {path} held-out accuracy {meta["holdout_accuracy"]:.3f} '
              f'({meta["cpu_s"]:.0f} s CPU when built)')
        paths[norm] = path
    return paths


if __name__ == '__main__':
    main()
