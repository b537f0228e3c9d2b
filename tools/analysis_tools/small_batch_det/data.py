"""The digits detection set of a setting (``tools/make_digits_det.py``), written once."""
from __future__ import annotations

from pathlib import Path

import make_digits_det


def ensure_data(root: Path, s: dict) -> Path:
    """The set of setting ``s`` under ``root/<size>px_<hash>/``, written unless it is there
    (the demo writes and finds the same directory)."""
    return make_digits_det.ensure(root, num_train=s['num_train'], num_val=s['num_val'],
                                  size=s['size'], seed=s['data_seed'], digits=s['digits'],
                                  digit_px=s['digit_px'], clutter=s['clutter'])
