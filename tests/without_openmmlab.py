"""Run a Python script with the OpenMMLab packages unimportable, as on the GPU machine
(torch, no mmcv, mmengine, mmdet or mmseg)::

    python tests/without_openmmlab.py SCRIPT [ARGS...]

A ``sys.meta_path`` finder raises ImportError for any of them, installed or not; the
script runs as ``__main__`` with ``ARGS``.
"""
import runpy
import sys

BLOCKED = ('mmengine', 'mmcv', 'mmdet', 'mmseg')


class Blocked:
    """Any import of an OpenMMLab package fails, as where none is installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'blocked: {name}')
        return None


def loaded() -> list:
    """The OpenMMLab modules imported so far (none, while blocked)."""
    return sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)


if __name__ == '__main__':
    sys.meta_path.insert(0, Blocked())
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
