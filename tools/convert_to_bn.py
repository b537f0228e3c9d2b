"""Turn a CBN checkpoint into a plain-BN one, for export and deployment.

At inference a CBN layer is a BatchNorm2d with the same parameters and running
statistics; this drops the window buffers (and the training state: optimizer,
message hub, schedulers), so the result loads strictly into the same model
built with ``norm_cfg=dict(type='BN')`` and needs no plugin.

    python tools/convert_to_bn.py work_dirs/x/epoch_12.pth bn_epoch_12.pth
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from cbn_plugin.convert import strip_window_state  # noqa: E402
from cbn_plugin.engine.files import save_checkpoint_file  # noqa: E402


def load(path: str) -> dict:
    try:
        checkpoint = torch.load(path, map_location='cpu')
    except Exception as error:  # torch raises several types for corrupt files
        raise SystemExit(f'convert_to_bn: cannot read checkpoint {path!r}: {error}') from error
    if not isinstance(checkpoint, dict):
        raise SystemExit(f'convert_to_bn: {path!r} holds a {type(checkpoint).__name__}, '
                         'expected a dict (a state_dict or a checkpoint with "state_dict")')
    return checkpoint


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='CBN checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the plain-BN checkpoint')
    args = parser.parse_args(argv)
    checkpoint = load(args.src)
    nested = 'state_dict' in checkpoint
    state, removed = strip_window_state(checkpoint['state_dict'] if nested else checkpoint)
    out = {'state_dict': state, 'meta': checkpoint.get('meta', {})} if nested else state
    save_checkpoint_file(out, args.dst)  # never a half-written file at dst
    layers = len({k.rsplit('.', 1)[0] for k in removed})
    print(f'convert_to_bn: {args.src} -> {args.dst}: removed window state of {layers} CBN '
          f'layers ({len(removed)} tensors), kept {len(state)} tensors')


if __name__ == '__main__':
    main()
