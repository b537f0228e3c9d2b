"""Inference as deployed: BN folded into the conv, CBN converted to BN and folded, GN.

A BN layer in eval mode is an affine map per channel, so it folds into the conv
before it (the conv's weight and bias absorb it) and costs nothing at inference.
CBN in eval mode is BN with its running statistics: ``cbn_plugin.convert_to_bn``
makes it an ``nn.BatchNorm2d`` with the same parameters, which then folds the same
way. GN normalises with statistics of each input, so it cannot be folded.

The folding here is a plain function of this benchmark (``fold_conv_norms``) over
``torch.nn.utils.fusion.fuse_conv_bn_eval``; the plugin ships no fold helper. It
folds every eval-mode ``nn.BatchNorm2d`` that directly follows a conv in the
layouts the detectors use: mmcv's ConvModule (conv then norm), the ResNet blocks'
``conv1``/``bn1`` siblings, and ``nn.Sequential`` (downsample shortcuts).

``benchmark.py --parts deploy`` times, side by side in one run, the digits
detector (every norm swapped) and the R50-FPN detector (norm in FPN + box head).
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import cbn_plugin
from host_overhead import DIGITS_GN_GROUPS, DIGITS_WINDOW, digits_batch, digits_detector, \
    median_and_fastest

GN_ROW = 'GN (cannot be folded)'
_NORM_SIBLING = re.compile(r'^(?:bn|norm)(\d*)$')


def _foldable(conv, norm) -> bool:
    return (type(norm) is nn.BatchNorm2d and not norm.training and norm.track_running_stats
            and isinstance(conv, nn.Conv2d) and not conv.training
            and conv.out_channels == norm.num_features)


def fold_conv_norms(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the conv feeding it, in place; returns how
    many were folded (the norm becomes ``nn.Identity``)."""
    folded = 0
    for parent in list(model.modules()):
        children = dict(parent.named_children())
        norm_name, order = getattr(parent, 'norm_name', None), getattr(parent, 'order', None)
        if isinstance(norm_name, str) and isinstance(order, tuple) and 'conv' in children \
                and norm_name in children and 'norm' in order \
                and order.index('conv') < order.index('norm') \
                and _foldable(children['conv'], children[norm_name]):
            parent.conv = fuse_conv_bn_eval(children['conv'], children[norm_name])
            setattr(parent, norm_name, nn.Identity())
            folded += 1
            continue
        for name, child in children.items():
            match = _NORM_SIBLING.match(name)
            conv = children.get(f'conv{match.group(1)}') if match else None
            if conv is not None and _foldable(conv, child):
                setattr(parent, f'conv{match.group(1)}', fuse_conv_bn_eval(conv, child))
                setattr(parent, name, nn.Identity())
                folded += 1
        if isinstance(parent, nn.Sequential):
            for i in range(len(parent) - 1):
                if _foldable(parent[i], parent[i + 1]):
                    parent[i] = fuse_conv_bn_eval(parent[i], parent[i + 1])
                    parent[i + 1] = nn.Identity()
                    folded += 1
    return folded


def count_norms(model: nn.Module) -> int:
    return sum(1 for m in model.modules()
               if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)))


def _randomise_running_stats(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters away from 0/1, as after training, so a
    wrong fold shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def deployed_models(build, bn_cfg, cbn_cfg, gn_cfg, device) -> dict:
    """The deployed models of one detector: ``build(norm_cfg) -> model``.

    The CBN model carries the BN model's state (the same parameters and running
    statistics, as CBN's state_dict is BN's), so BN and converted CBN do exactly
    the same work and their outputs must agree."""
    torch.manual_seed(0)
    bn = build(bn_cfg)
    _randomise_running_stats(bn)
    bn.eval()
    torch.manual_seed(0)
    cbn = build(cbn_cfg)
    cbn.load_state_dict(bn.state_dict())
    cbn_plugin.bind(cbn, logger=None)
    cbn.eval()
    torch.manual_seed(0)
    gn = build(gn_cfg)
    _randomise_running_stats(gn)  # its BN backbone, where there is one
    gn.eval()
    bn_folded = copy.deepcopy(bn)
    cbn_folded = cbn_plugin.convert_to_bn(copy.deepcopy(cbn))
    gn_folded = copy.deepcopy(gn)
    folds = {name: fold_conv_norms(m) for name, m in
             (('bn', bn_folded), ('cbn', cbn_folded), ('gn', gn_folded))}
    return {
        'BN, not folded': (bn, None),
        'BN folded into the conv': (bn_folded, folds['bn']),
        'CBN in eval mode, not converted': (cbn, None),
        'CBN converted to BN (convert_to_bn) and folded': (cbn_folded, folds['cbn']),
        GN_ROW: (gn_folded, folds['gn']),
    }


def _predict(model, data):
    def call():
        with torch.no_grad():
            return model(**data, mode='predict')
    return call


def _boxes(results) -> torch.Tensor:
    return torch.cat([r.pred_instances.bboxes for r in results])


def detector_inference(name: str, build, cfgs: tuple, batch, args, device, repeats) -> dict:
    models = deployed_models(build, *cfgs, device)
    data = models['BN, not folded'][0].data_preprocessor(batch, False)
    calls = {label: _predict(m, data) for label, (m, _) in models.items()}
    reference = _boxes(calls['BN, not folded']())
    agree = {}
    for label in ('BN folded into the conv', 'CBN in eval mode, not converted',
                  'CBN converted to BN (convert_to_bn) and folded'):
        boxes = _boxes(calls[label]())
        agree[label] = (boxes.shape == reference.shape
                        and torch.allclose(boxes, reference, rtol=1e-3, atol=1e-2))
    for call in calls.values():  # warm-up
        call()
    median, fastest = median_and_fastest(calls, repeats, device)
    base = 'BN folded into the conv'
    rows = [dict(model=label, norms_left=count_norms(m), folded=folded,
                 s_median=median[label], s_fastest=fastest[label],
                 vs_bn_folded_median=median[label] / median[base],
                 vs_bn_folded_fastest=fastest[label] / fastest[base],
                 same_boxes_as_bn=agree.get(label))
            for label, (m, folded) in models.items()]
    print(f'  {name}: ' + ', '.join(f'{r["model"]} {r["vs_bn_folded_fastest"]:.3f}x'
                                    for r in rows), flush=True)
    return dict(detector=name, rows=rows)


def run(args, device, r50_cfg=None) -> dict:
    """Both detectors; ``r50_cfg(norm_cfg, args)`` is benchmark.py's R50-FPN config."""
    out = dict(device=str(device))
    digits_cfgs = (dict(type='BN', requires_grad=True),
                   dict(type='CBN', window_size=DIGITS_WINDOW),
                   dict(type='GN', num_groups=DIGITS_GN_GROUPS, requires_grad=True))
    out['digits'] = detector_inference(
        'digits detector (every norm swapped), 1 image of 128x128',
        lambda cfg: digits_detector(cfg, device, args.digits_width), digits_cfgs,
        digits_batch(device), args, device, args.deploy_repeats)
    if r50_cfg is not None and args.deploy_r50:
        from mmdet.registry import MODELS
        from mmdet.testing import demo_mm_inputs
        from mmdet.utils import register_all_modules
        register_all_modules()
        torch.manual_seed(0)
        batch = demo_mm_inputs(1, (3, args.image, args.image), num_items=[8], num_classes=80,
                               device=str(device))
        r50_cfgs = (dict(type='BN'), dict(type='CBN', window_size=args.window),
                    dict(type='GN', num_groups=32))
        out['r50'] = detector_inference(
            f'R50-FPN, norm in FPN + box head (the backbone\'s BN folded in every row), '
            f'1 image of {args.image}x{args.image}',
            lambda cfg: MODELS.build(r50_cfg(cfg, args)).to(device), r50_cfgs, batch, args,
            device, args.r50_deploy_repeats)
    return out


def render(result: dict) -> list[str]:
    lines = []
    for key in ('digits', 'r50'):
        part = result.get(key)
        if not part:
            continue
        lines += ['', f'### {part["detector"]}', '',
                  '| model | norm layers left | folded | s/image (fastest) | vs BN folded '
                  '(fastest) | vs BN folded (median) | same boxes as BN |',
                  '|---|---|---|---|---|---|---|']
        for r in part['rows']:
            same = {None: '(reference)' if r['model'] == 'BN, not folded' else '-',
                    True: 'yes', False: 'NO'}[r['same_boxes_as_bn']]
            lines.append(f'| {r["model"]} | {r["norms_left"]} | {r["folded"] or "-"} | '
                         f'{r["s_fastest"]:.3f} | {r["vs_bn_folded_fastest"]:.3f} | '
                         f'{r["vs_bn_folded_median"]:.3f} | {same} |')
        by = {r['model']: r for r in part['rows']}
        cbn = by['CBN converted to BN (convert_to_bn) and folded']
        gn = by[GN_ROW]
        unfolded = by['BN, not folded']
        lines += ['', f'- Deployment gets: CBN converted and folded runs the same network as '
                  f'BN folded ({cbn["vs_bn_folded_fastest"]:.3f}x its time, '
                  f'{cbn["norms_left"]} norm layers left, same boxes: '
                  f'{"yes" if cbn["same_boxes_as_bn"] else "NO"}); GN keeps its '
                  f'{gn["norms_left"]} norm layers and takes {gn["vs_bn_folded_fastest"]:.3f}x; '
                  f'folding itself saves {1 - 1 / unfolded["vs_bn_folded_fastest"]:.1%} of the '
                  'unfolded BN model\'s time.',
                  f'- Timing spread of this run: BN folded and CBN converted and folded are the '
                  f'same network with the same weights, so their ratio '
                  f'({cbn["vs_bn_folded_fastest"]:.3f}x fastest, {cbn["vs_bn_folded_median"]:.3f}x '
                  'median) is what the machine\'s load alone does to these timings; differences '
                  'within it are not measured.']
    return lines
