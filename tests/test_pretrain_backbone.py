"""tools/analysis_tools/pretrain_backbone.py: the pretrained backbone of the
pretrained-detection study, on a tiny recipe.

The checkpoint must load strictly into the detector's backbone as BN, and as CBN (a
_BatchNorm with BN's parameters and statistics), and the GN twin into a GN backbone; the
cache must be reused unless the recipe changes; and no detection val digit may reach
pretraining.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'analysis_tools' / 'pretrain_backbone.py'


@pytest.fixture(scope='module')
def pb():
    spec = importlib.util.spec_from_file_location('pretrain_backbone', TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules['pretrain_backbone'] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny(pb):
    return dict(pb.TINY_RECIPE)


@pytest.fixture(scope='module')
def tiny_ckpts(pb, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp('pretrained')
    return {norm: pb.ensure_pretrained(dict(tiny, norm=norm), root, log=None)
            for norm in ('bn', 'gn')}


def _detector_backbone(pb, norm_cfg, width=8):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    import cbn_plugin  # noqa: F401  (registers CBN)
    register_all_modules(init_default_scope=False)
    cfg = pb.backbone_cfg(width, 'bn')
    cfg['norm_cfg'] = norm_cfg
    return MODELS.build(cfg)


def test_pools_never_touch_the_detection_val_digits(pb, tiny, tmp_path):
    import make_digits_det
    pools = pb.source_pools(tiny)
    train, val = set(pools['pretrain'].tolist()), set(pools['detection_val'].tolist())
    holdout = set(pools['holdout'].tolist())
    assert train and holdout and val
    assert not train & val and not holdout & val and not train & holdout
    # together they are the detection train pool: nothing of it is lost either
    from sklearn.datasets import load_digits
    split = make_digits_det.split_sources(load_digits().target, 0.2, 0)
    assert train | holdout == set(split['train'].tolist())
    # the detection set's val canvases draw from exactly the pool called detection_val
    make_digits_det.build(tmp_path, num_train=2, num_val=6, size=64, digit_size=(8, 20))
    ann = json.loads((tmp_path / 'annotations' / 'val.json').read_text())['annotations']
    assert {a['digit_index'] for a in ann} <= val
    # crops draw only from the pool they are given, with the right labels
    _, labels, used = pb.make_crops(tiny, pools['pretrain'], 40, stream=0)
    assert set(used.tolist()) <= train
    assert (labels == load_digits().target[used]).all()


def test_checkpoint_records_the_sources_it_used(pb, tiny, tiny_ckpts):
    meta = pb.read_meta(tiny_ckpts['bn'])
    pools = pb.source_pools(tiny)
    assert set(meta['sources_used']) <= set(pools['pretrain'].tolist())
    assert not set(meta['sources_used']) & set(pools['detection_val'].tolist())
    assert not set(meta['holdout_sources']) & set(pools['detection_val'].tolist())
    assert meta['recipe'] == pb.check_recipe(dict(tiny, norm='bn'))
    assert 0.0 <= meta['holdout_accuracy'] <= 1.0


@pytest.mark.parametrize('norm_cfg', [dict(type='BN', requires_grad=True),
                                      dict(type='BN', requires_grad=False),
                                      dict(type='CBN', requires_grad=True, window_size=4)])
def test_bn_checkpoint_loads_strictly_into_bn_and_cbn_backbones(pb, tiny_ckpts, norm_cfg):
    from mmengine.runner import load_checkpoint
    backbone = _detector_backbone(pb, norm_cfg)
    saved = torch.load(tiny_ckpts['bn'], map_location='cpu', weights_only=False)['state_dict']
    load_checkpoint(backbone, str(tiny_ckpts['bn']), strict=True)
    own = backbone.state_dict()
    for key, value in saved.items():
        assert torch.equal(own[key], value), key
    # the running statistics were trained, not left at their initial 0 / 1
    assert not torch.equal(own['bn1.running_mean'], torch.zeros_like(own['bn1.running_mean']))


def test_gn_twin_loads_strictly_into_gn_and_not_into_bn(pb, tiny_ckpts):
    from mmengine.runner import load_checkpoint
    gn = _detector_backbone(pb, dict(type='GN', num_groups=8, requires_grad=True))
    load_checkpoint(gn, str(tiny_ckpts['gn']), strict=True)
    bn = _detector_backbone(pb, dict(type='BN', requires_grad=True))
    with pytest.raises(RuntimeError, match='gn1'):
        load_checkpoint(bn, str(tiny_ckpts['gn']), strict=True)


def test_init_cfg_loads_it_as_users_load_imagenet_weights(pb, tiny_ckpts):
    from mmdet.registry import MODELS
    cfg = pb.backbone_cfg(8, 'bn')
    cfg['norm_cfg'] = dict(type='CBN', requires_grad=True, window_size=2)
    cfg['init_cfg'] = dict(type='Pretrained', checkpoint=str(tiny_ckpts['bn']))
    backbone = MODELS.build(cfg)
    saved = torch.load(tiny_ckpts['bn'], map_location='cpu', weights_only=False)['state_dict']
    assert not torch.equal(backbone.conv1.weight, saved['conv1.weight'])
    backbone.init_weights()
    own = backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items())



def test_cache_is_reused_and_rebuilt_when_the_recipe_changes(pb, tiny, tmp_path, monkeypatch):
    calls = []
    real = pb.pretrain

    def counting(recipe, log=print):
        calls.append(recipe)
        return real(recipe, log=log)

    monkeypatch.setattr(pb, 'pretrain', counting)
    first = pb.ensure_pretrained(dict(tiny, norm='bn'), tmp_path, log=None)
    again = pb.ensure_pretrained(dict(tiny, norm='bn'), tmp_path, log=None)
    assert first == again and len(calls) == 1
    other = pb.ensure_pretrained(dict(tiny, norm='bn', lr=0.05), tmp_path, log=None)
    assert other != first and len(calls) == 2
    # a manifest that records another recipe (an edited or stale cache) is rebuilt
    manifest = first.with_suffix('.json')
    stale = json.loads(manifest.read_text())
    stale['recipe']['lr'] = 0.5
    manifest.write_text(json.dumps(stale))
    pb.ensure_pretrained(dict(tiny, norm='bn'), tmp_path, log=None)
    assert len(calls) == 3
    # a checkpoint without its manifest (an interrupted write) is rebuilt too
    manifest.unlink()
    pb.ensure_pretrained(dict(tiny, norm='bn'), tmp_path, log=None)
    assert len(calls) == 4


def test_same_recipe_same_weights(pb, tiny):
    a, _ = pb.pretrain(dict(tiny, norm='bn', images=32), log=None)
    b, _ = pb.pretrain(dict(tiny, norm='bn', images=32), log=None)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('change, message', [
    (dict(norm='cbn'), "norm='cbn'"), (dict(colour=1), 'colour'),
    (dict(digit_px=[10, 99]), 'digit_px'), (dict(images=0), 'images=0'),
    (dict(holdout_fraction=1.0), 'holdout_fraction')])
def test_bad_recipe_is_named(pb, change, message):
    with pytest.raises(ValueError, match=message):
        pb.check_recipe(change)


def test_crops_are_deterministic_and_normalised_like_the_detector(pb, tiny):
    pools = pb.source_pools(tiny)
    a = pb.make_crops(tiny, pools['pretrain'], 5, stream=0)
    b = pb.make_crops(tiny, pools['pretrain'], 5, stream=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (5, tiny['crop'], tiny['crop'], 3)
    x = pb.to_tensor(np.full((1, 2, 2, 3), 255, np.uint8))
    assert torch.allclose(x[0, :, 0, 0], (255 - torch.tensor(pb.PIXEL_MEAN)) /
                          torch.tensor(pb.PIXEL_STD))
