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
