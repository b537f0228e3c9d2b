"""Conversion to plain BN for deployment, and from BN models to CBN."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmcv.cnn import ConvModule
from torch import nn

import cbn_plugin
from cbn_plugin import CBN
from cbn_plugin.convert import convert_bn_to_cbn, convert_to_bn

ROOT = Path(__file__).resolve().parents[1]


def trained(norm='CBN', steps=6):
    torch.manual_seed(0)
    model = nn.Sequential(ConvModule(3, 8, 3, padding=1, norm_cfg=dict(type=norm)),
                          ConvModule(8, 8, 1, norm_cfg=dict(type=norm)))
    if norm == 'CBN':
        model[1].bn.running_stats = 'window'
    cbn_plugin.bind(model, logger=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.randn(2, 3, 6, 6) * 2 + 1).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        cbn_plugin.step(model)
    return model


def test_convert_to_bn_gives_identical_eval_outputs():
    model = trained()
    assert model[0].bn.window_mean is not None
    plain = convert_to_bn(copy.deepcopy(model))
    assert not any(isinstance(m, CBN) for m in plain.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in plain.modules()) == 2
    model.eval(), plain.eval()
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    bn_model = trained(norm='BN', steps=0)
    bn_model.load_state_dict(plain.state_dict(), strict=True)


def test_convert_bn_to_cbn_keeps_outputs_and_binds():
    bn_model = trained(norm='BN')
    bn_model.append(nn.SyncBatchNorm(8))
    cbn_model = convert_bn_to_cbn(copy.deepcopy(bn_model), window_size=3, rho=0.5)
    cbns = [m for m in cbn_model.modules() if isinstance(m, CBN)]
    assert len(cbns) == 2 and all(m.window_size == 3 and m.rho == 0.5 for m in cbns)
    assert type(cbn_model[2]) is nn.SyncBatchNorm  # only plain BN is converted
    bn_model.eval(), cbn_model.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(cbn_model[:2](x), bn_model[:2](x), rtol=0, atol=0)
    assert len(cbn_plugin.bind(cbn_model, logger=None)) == 2


def test_convert_script_on_checkpoint_files(tmp_path):
    model = trained()
    src, dst = tmp_path / 'cbn.pth', tmp_path / 'bn.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {'epoch': 3}}, src)
    run = subprocess.run([sys.executable, str(ROOT / 'tools/convert_to_bn.py'), str(src), str(dst)],
                         capture_output=True, text=True, check=True)
    assert 'removed window state of 2 CBN layers' in run.stdout
    converted = torch.load(dst)  # plain weights_only load
    bn_model = trained(norm='BN', steps=0)
    bn_model.load_state_dict(converted['state_dict'], strict=True)
    bn_model.eval(), model.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(bn_model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize('content', [b'', b'not a checkpoint at all'])
def test_convert_script_names_a_corrupt_file(tmp_path, content):
    src = tmp_path / 'broken.pth'
    src.write_bytes(content)
    run = subprocess.run([sys.executable, str(ROOT / 'tools/convert_to_bn.py'), str(src),
                          str(tmp_path / 'out.pth')], capture_output=True, text=True)
    assert run.returncode != 0 and f"cannot read checkpoint '{src}'" in run.stderr
    assert not (tmp_path / 'out.pth').exists()


def test_convert_sync_cbn_keeps_window_and_converts_plain_bn():
    from cbn_plugin import SyncCBN
    model = trained()
    model.append(nn.BatchNorm2d(8))
    window = model[0].bn.window_mean.clone()
    synced = cbn_plugin.convert_sync_cbn(copy.deepcopy(model))
    assert type(synced[0].bn) is SyncCBN and type(synced[1].bn) is SyncCBN
    assert type(synced[2]) is nn.SyncBatchNorm
    assert torch.equal(synced[0].bn.window_mean, window)
    assert synced[1].bn.running_stats == 'window'
    assert len(cbn_plugin.bind(synced, logger=None)) == 2
    synced.eval(), model.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(synced[:2](x), model[:2](x), rtol=0, atol=0)
