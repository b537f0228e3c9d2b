"""A ResNet-50 + FPN + RPN head + 4conv1fc box head training step in plain torch modules.

For the GPU check (``gpu_check.py``): the machine it runs on has torch and no mmcv or
mmdet, so the detector's layers at their detection sizes are written here with
``torch.nn`` alone, as MMDetection's Faster R-CNN R50-FPN 4conv1fc lays them out:

- backbone: ResNet-50 (stem, bottleneck stages of 3, 4, 6, 3 blocks, widths 64..512 x 4),
  every conv followed by a norm; ``conv1``/``bn1`` and ``nn.Sequential`` layouts, which
  ``cbn_plugin.bind`` pairs by structure;
- FPN: 1x1 lateral and 3x3 output convs with norms (``norm_cfg`` in FPN), top-down sum;
- RPN head: a shared 3x3 conv and 1x1 classification / regression convs over P2-P6
  (no norm, as in MMDetection);
- box head: RoI features of ``rois`` boxes per image, 7x7, taken from P2-P5 (a quarter
  on each level) by bilinear sampling (``grid_sample`` on a fixed grid: the sizes and the
  gradient paths of RoIAlign, not its exact sampling), then 4 x (3x3 conv, norm, ReLU),
  fc 1024, classification and box regression.

The boxes, labels and targets are random and fixed per batch: what is measured is a
training step's cost and numerical health, not detection quality. Every tensor of a
step is created on the batch's device when the batch is made, none inside the step.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import cbn_plugin

STAGE_BLOCKS = (3, 4, 6, 3)
CLASSES = 80
ROI = 7
ANCHORS = 3
GN_GROUPS = 32

# Where the norm under test goes: 'fpn_head' is the paper's placement (the backbone
# keeps BN), 'all' puts it in the backbone too.
PLACEMENTS = ('fpn_head', 'all')


def make_norm(kind: str, channels: int) -> nn.Module:
    """``'bn'`` or ``'gn'`` (32 groups, fewer when the channels do not divide).
    CBN comes from BN by ``cbn_plugin.convert_bn_to_cbn`` (``build_stack``)."""
    if kind == 'gn':
        return nn.GroupNorm(math.gcd(GN_GROUPS, channels), channels)
    return nn.BatchNorm2d(channels)


def conv_norm(cin: int, cout: int, kernel: int, stride: int, norm: str, relu: bool):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
              make_norm(norm, cout)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, norm: str):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = make_norm(norm, width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = make_norm(norm, cout)
        self.downsample = (conv_norm(cin, cout, 1, stride, norm, relu=False)
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet-50 (``blocks`` per stage, ``base`` the first stage's width); C2-C5 out."""

    def __init__(self, norm: str, base: int = 64, blocks=STAGE_BLOCKS):
        super().__init__()
        self.stem = nn.Sequential(*conv_norm(3, base, 7, 2, norm, relu=True),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], base
        for index, count in enumerate(blocks):
            width = base * 2 ** index
            stage = []
            for block in range(count):
                stage.append(Bottleneck(cin, width, 2 if block == 0 and index else 1, norm))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(stages)
        self.out_channels = [base * 2 ** i * Bottleneck.expansion for i in range(len(blocks))]

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class FPN(nn.Module):
    """Lateral 1x1 and output 3x3 conv + norm per level, top-down nearest upsampling;
    P6 by max pooling P5 (for the RPN), as MMDetection's FPN with ``num_outs=5``."""

    def __init__(self, in_channels, channels: int, norm: str):
        super().__init__()
        self.lateral = nn.ModuleList(conv_norm(c, channels, 1, 1, norm, relu=False)
                                     for c in in_channels)
        self.output = nn.ModuleList(conv_norm(channels, channels, 3, 1, norm, relu=False)
                                    for _ in in_channels)

    def forward(self, feats):
        laterals = [lateral(f) for lateral, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode='nearest')
        outs = [conv(lat) for conv, lat in zip(self.output, laterals)]
        return outs + [F.max_pool2d(outs[-1], 1, stride=2)]


class RPNHead(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls = nn.Conv2d(channels, ANCHORS, 1)
        self.reg = nn.Conv2d(channels, ANCHORS * 4, 1)

    def forward(self, feats):
        outs = [F.relu(self.conv(f)) for f in feats]
        return [self.cls(o) for o in outs], [self.reg(o) for o in outs]


class BoxHead(nn.Module):
    """4 x (3x3 conv, norm, ReLU) over the RoI features, fc 1024, cls and box outputs."""

    def __init__(self, channels: int, norm: str, fc: int = 1024):
        super().__init__()
        self.convs = nn.Sequential(*(conv_norm(channels, channels, 3, 1, norm, relu=True)
                                     for _ in range(4)))
        self.fc = nn.Linear(channels * ROI * ROI, fc)
        self.cls = nn.Linear(fc, CLASSES + 1)
        self.reg = nn.Linear(fc, CLASSES * 4)

    def forward(self, rois):
        x = F.relu(self.fc(self.convs(rois).flatten(1)))
        return self.cls(x), self.reg(x)


class Batch(NamedTuple):
    """One step's inputs and fixed random targets, all on one device."""
    images: torch.Tensor        # N x 3 x H x W
    grids: list                 # per level: N x (R_level * 7) x 7 x 2 sampling grid
    labels: torch.Tensor        # N * R
    box_targets: torch.Tensor   # N * R x 4
    rpn_targets: list           # per level: N x A x h x w in {0, 1}


class DetectionStack(nn.Module):
    """Backbone, FPN, RPN head and box head, with ``loss(batch)`` as the training loss."""

    def __init__(self, backbone_norm: str, neck_norm: str, base: int = 64,
                 channels: int = 256, blocks=STAGE_BLOCKS):
        super().__init__()
        self.backbone = ResNet(backbone_norm, base, blocks)
        self.neck = FPN(self.backbone.out_channels, channels, neck_norm)
        self.rpn_head = RPNHead(channels)
        self.roi_head = BoxHead(channels, neck_norm)

    def forward(self, images, grids):
        feats = self.neck(self.backbone(images))
        rpn_cls, rpn_reg = self.rpn_head(feats)
        rois = torch.cat([roi_features(f, g) for f, g in zip(feats, grids)])
        cls, reg = self.roi_head(rois)
        return rpn_cls, rpn_reg, cls, reg

    def loss(self, batch: Batch) -> torch.Tensor:
        rpn_cls, rpn_reg, cls, reg = self(batch.images, batch.grids)
        loss = F.cross_entropy(cls, batch.labels) + F.smooth_l1_loss(
            reg[:, :4], batch.box_targets)
        for logits, deltas, target in zip(rpn_cls, rpn_reg, batch.rpn_targets):
            loss = loss + F.binary_cross_entropy_with_logits(logits, target) \
                + 0.1 * deltas.square().mean()
        return loss


def roi_features(feat: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``R`` RoIs of 7x7 per image from one level: one ``grid_sample`` per level with the
    RoIs stacked along the output's height, then one RoI per row of the result."""
    n, c = feat.shape[:2]
    sampled = F.grid_sample(feat, grid, align_corners=False)  # N x C x (R*7) x 7
    return sampled.view(n, c, -1, ROI, ROI).transpose(1, 2).reshape(-1, c, ROI, ROI)


def roi_grid(boxes: torch.Tensor) -> torch.Tensor:
    """The ``grid_sample`` grid of ``boxes`` (N x R x 4, x1 y1 x2 y2 in [-1, 1]):
    N x (R*7) x 7 x 2, bin centres."""
    steps = (torch.arange(ROI, device=boxes.device, dtype=boxes.dtype) + 0.5) / ROI
    x1, y1, x2, y2 = boxes.unbind(-1)                                  # N x R
    xs = x1[..., None] + (x2 - x1)[..., None] * steps                  # N x R x 7
    ys = y1[..., None] + (y2 - y1)[..., None] * steps
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), -1)
    return grid.reshape(boxes.shape[0], -1, ROI, 2)                   # N x (R*7) x 7 x 2


def level_shapes(height: int, width: int, levels: int = 5) -> list[tuple[int, int]]:
    """The (h, w) of P2..P6 for an input of ``height`` x ``width`` (the convs' arithmetic)."""
    h, w = (height + 1) // 2, (width + 1) // 2      # stem conv, stride 2
    h, w = (h + 1) // 2, (w + 1) // 2               # max pool, stride 2: P2
    shapes = [(h, w)]
    for _ in range(levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        shapes.append((h, w))
    return shapes


def make_batch(images: int, height: int, width: int, rois: int, device,
               seed: int = 0, dtype=torch.float32) -> Batch:
    """Random images, ``rois`` RoIs per image split over P2-P5, random targets; made on
    ``device`` with a generator there (nothing crosses from the host in a step)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    device = torch.device(device)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device, dtype=dtype)

    per_level = [rois // 4 + (1 if i < rois % 4 else 0) for i in range(4)]
    grids = []
    for count in per_level:
        centre, size = rand(images, count, 2) * 1.6 - 0.8, rand(images, count, 2) * 0.3 + 0.05
        grids.append(roi_grid(torch.cat([centre - size, centre + size], -1)))
    total = images * rois
    labels = torch.randint(0, CLASSES + 1, (total,), generator=gen, device=device)
    rpn = [(rand(images, ANCHORS, h, w) > 0.9).to(dtype)
           for h, w in level_shapes(height, width)]
    return Batch(rand(images, 3, height, width) * 2 - 1, grids, labels,
                 rand(total, 4) - 0.5, rpn)


def build_stack(norm: str, placement: str = 'fpn_head', window_size: int = 8,
                base: int = 64, channels: int = 256, blocks=STAGE_BLOCKS, **cbn) -> DetectionStack:
    """The stack with ``norm`` (``'bn'``, ``'gn'``, ``'cbn'``) where ``placement`` says and
    BN elsewhere; CBN by the plugin's converter from BN, then bound (no burn-in)."""
    if placement not in PLACEMENTS:
        raise ValueError(f'placement must be one of {PLACEMENTS}, got {placement!r}')
    plain = 'bn' if norm == 'cbn' else norm
    model = DetectionStack(plain if placement == 'all' else 'bn', plain, base, channels, blocks)
    if norm == 'cbn':
        parts = [model] if placement == 'all' else [model.neck, model.roi_head]
        for part in parts:
            cbn_plugin.convert_bn_to_cbn(part, window_size=window_size, **cbn)
        cbn_plugin.bind(model, logger=None)
    return model
