"""``CheckpointFileCheckHook``: a damaged checkpoint file is refused by name before loading.

The checks are :func:`.files.check_checkpoint_file`; see ``docs/checkpoints.md``.
"""
from __future__ import annotations

from .concern import CheckpointConcernHook
from .files import check_checkpoint_file, checkpoint_to_load, is_local_path


class CheckpointFileCheckHook(CheckpointConcernHook):
    """Check the checkpoint file a Runner is about to load or resume, in ``before_run``.

    ``Runner.train``/``val``/``test`` call ``before_run`` before
    ``load_or_resume``; the file (``load_from``, ``--resume PATH``, or the one
    ``work_dir/last_checkpoint`` names) is checked with
    :func:`.check_checkpoint_file`, which raises ``FileNotFoundError`` /
    :class:`.CheckpointFileError` naming it (and the ``last_checkpoint``
    record that named it) when it is missing, empty, truncated, fails a
    CRC-32 check or is no checkpoint at all. Remote paths are not checked.

    Priority ``'VERY_HIGH'``: the refusal comes before other hooks' ``before_run``.
    """

    priority = 'VERY_HIGH'
    concern = 'check_files'

    def before_run(self, runner) -> None:
        if not self.claim(runner):
            return
        path, source = checkpoint_to_load(runner)
        if path is not None and is_local_path(path):
            check_checkpoint_file(path, note=source)
