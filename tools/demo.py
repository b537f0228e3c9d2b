"""The smallest real thing the plugin does: CBN inside mmcv ConvModules, trained.

A 3-conv classifier on scikit-learn's bundled handwritten digits (real data,
no download), built from mmcv ``ConvModule``s with ``norm_cfg=dict(type=...)``,
trained at batch 2 with BN and with CBN, side by side, printing the window the
layers really use, the size of the compensation, and test accuracy.

Run: ``make demo`` (or ``.venv/bin/python tools/demo.py --help``).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from mmcv.cnn import ConvModule
from sklearn.datasets import load_digits
from torch import nn

import cbn_plugin


def digits(seed: int):
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def classifier(norm_cfg: dict) -> nn.Module:
    return nn.Sequential(
        ConvModule(1, 16, 3, padding=1, norm_cfg=norm_cfg),
        ConvModule(16, 32, 3, stride=2, padding=1, norm_cfg=norm_cfg),
        ConvModule(32, 32, 3, stride=2, padding=1, norm_cfg=norm_cfg),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def train(name: str, norm_cfg: dict, args) -> dict:
    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = digits(args.seed)
    model = classifier(norm_cfg)
    cbn_plugin.bind(model, logger=None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)
    start, losses = time.perf_counter(), []
    for it in range(args.steps):
        idx = torch.randint(len(x_train), (args.batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        cbn_plugin.step(model)
        losses.append(loss.item())
        if (it + 1) % args.log_every == 0:
            layer = next((m for _, m in cbn_plugin.cbn_layers(model)), None)
            extra = ''
            if layer is not None and 'window' in layer.diagnostics:
                d = layer.diagnostics
                extra = (f'  window {d["window"]}  mean shift {float(d["mean_shift"]):.3f} std'
                         f'  clamped {float(d["negative_fraction"]):.1%}')
            print(f'  {name:>4} step {it + 1:>5}  loss {np.mean(losses[-args.log_every:]):.3f}{extra}',
                  flush=True)
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
    return dict(name=name, acc=acc, loss=float(np.mean(losses[-args.log_every:])),
                seconds=time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=1500)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--lr', type=float, default=0.005)
    parser.add_argument('--window', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--log-every', type=int, default=250)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [('BN', dict(type='BN')),
            ('CBN', dict(type='CBN', window_size=args.window)),
            ('nCBN', dict(type='CBN', window_size=args.window, rho=0.0))]
    print(f'digits classifier, batch {args.batch}, {args.steps} steps, lr {args.lr}')
    results = [train(name, cfg, args) for name, cfg in runs]
    print('\nnorm   test acc   final loss   time')
    for r in results:
        print(f'{r["name"]:<6} {r["acc"]:>8.3f}   {r["loss"]:>10.3f}   {r["seconds"]:.0f}s')


if __name__ == '__main__':
    main()
