"""Fixtures shared by the test files (helpers they import are in ``helpers.py`` and
``tiny_coco.py``; ``setup.cfg`` puts this folder on ``sys.path``)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope='module')
def keep_default_scope():
    """Put back the default scope a test module found.

    A Runner makes its scope ('mmengine') the current one, process-wide; test
    modules that build Runners use this (``pytestmark =
    pytest.mark.usefixtures('keep_default_scope')``) so that the scope other
    modules (mmdet's) had set survives them.
    """
    from mmengine.registry import DefaultScope
    saved = dict(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict = type(DefaultScope._instance_dict)(saved)


@pytest.fixture(scope='session')
def tiny_coco_set(tmp_path_factory):
    """``make(num_images, seed)``: the ``tiny_coco.py`` set of that size and seed, written once."""
    from tiny_coco import write_tiny_coco
    made = {}

    def make(num_images: int = 4, seed: int = 0) -> dict:
        if (num_images, seed) not in made:
            root = tmp_path_factory.mktemp(f'tiny_coco_{num_images}_{seed}')
            made[num_images, seed] = write_tiny_coco(root, num_images=num_images, seed=seed)
        return made[num_images, seed]

    return make


PAPER_CONFIGS = {'CBN': 'faster-rcnn_r50_fpn_4conv1fc-cbn_1x_coco.py',
                 'SyncCBN': 'faster-rcnn_r50_fpn_4conv1fc-synccbn_1x_coco.py'}


@pytest.fixture(scope='module')
def two_process_runs(request, tmp_path_factory, tiny_coco_set):
    """``runs['CBN']``, ``runs['SyncCBN']``: the test module's two-process run of that paper config.

    The distributed test files train the real CBN and SyncCBN Faster R-CNN
    configs with 2 processes on the same 8 tiny COCO images (2 iterations of
    2 images per process and epoch). Each module defines
    ``build_run(tmp, data, config)`` (what it launches and keeps); a kind is
    built once per module, on first use, in its own temporary folder.
    """
    from helpers import REPO
    build = request.module.build_run
    data = tiny_coco_set(8, 0)

    class Runs(dict):
        def __missing__(self, kind):
            if kind not in PAPER_CONFIGS:
                raise KeyError(f'{kind!r}: two_process_runs has {sorted(PAPER_CONFIGS)}')
            config = REPO / 'configs' / 'cbn' / PAPER_CONFIGS[kind]
            assert config.exists(), f'{config} is missing'
            self[kind] = build(tmp_path_factory.mktemp(f'two_process_{kind}'), data, config)
            return self[kind]

    return Runs()
