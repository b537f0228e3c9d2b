"""Checkpoint files: checked before loading, written atomically.

:func:`check_checkpoint_file` refuses a missing, empty, truncated, corrupt or
foreign file by name; :func:`atomic_save_checkpoint` wraps a Runner's
``save_checkpoint`` so a local file appears complete or not at all, and
:func:`save_checkpoint_file` does the same for a checkpoint dict written
outside a Runner. See ``docs/checkpoints.md`` (Checkpoint files).
"""
from __future__ import annotations

import functools
import inspect
import os
import os.path as osp
import re
import zipfile

import torch
from mmengine.dist import is_main_process

from ..mmengine_internals import runner_has_loaded, runner_load_from, runner_resumes


class CheckpointFileError(RuntimeError):
    """A checkpoint file that is truncated, corrupt or not a checkpoint at all."""


# torch.save's legacy (non-zip) format opens with a pickled magic number.
_LEGACY_MAGIC = b'\x8a\x0a' + (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')
_ZIP_LOCAL_HEADER = b'PK\x03\x04'
_URI = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def check_checkpoint_file(path, crc: bool = True, what: str = 'checkpoint',
                          note: str = '') -> None:
    """Raise a clear error naming ``path`` when it cannot be a complete ``torch.save`` file.

    ``torch.save`` writes a zip archive whose directory sits at the very end,
    so a file cut short anywhere (a crash or a full disk while writing, an
    interrupted copy) has no directory and is caught without reading it.
    ``crc=True`` also reads every member once and checks its CRC-32 (bit rot,
    overwritten blocks). Files in torch's pre-1.6 format are accepted
    unchecked (they hold no directory or checksums). Raises
    ``FileNotFoundError`` or :class:`CheckpointFileError`; their message
    starts with ``f'{what} {path}{note}'``.
    """
    path = os.fspath(path)
    name = f'{what} {path}{note}'
    if not osp.exists(path):
        raise FileNotFoundError(f'{name} does not exist')
    if not osp.isfile(path):
        raise CheckpointFileError(f'{name} is not a file')
    size = osp.getsize(path)
    if size == 0:
        raise CheckpointFileError(f'{name} is empty (0 bytes): it was never written '
                                  'completely (a crash or a full disk while saving?)')
    with open(path, 'rb') as f:
        head = f.read(64)
    if head.startswith(_ZIP_LOCAL_HEADER):
        if not zipfile.is_zipfile(path):
            raise CheckpointFileError(
                f'{name} is truncated ({size} bytes, and the zip directory that '
                'torch.save writes last is missing): it was cut short while being written '
                'or copied (a crash or a full disk?). Use an earlier checkpoint.')
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if not any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
                    raise CheckpointFileError(f'{name} is a zip archive but not a '
                                              'torch.save file (it has no data.pkl)')
                bad = archive.testzip() if crc else None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise CheckpointFileError(f'{name} is a corrupt zip archive ({size} '
                                      f'bytes): {err}') from err
        if bad is not None:
            raise CheckpointFileError(f'{name} is corrupt: its member {bad!r} fails the '
                                      'CRC-32 check (the file was damaged after it was written)')
        return
    if head.startswith(b'\x80') and _LEGACY_MAGIC in head:
        return  # torch's legacy format: nothing cheap to check
    raise CheckpointFileError(
        f'{name} is not a PyTorch checkpoint ({size} bytes starting with '
        f'{head[:8]!r}, neither the zip archive torch.save writes nor its legacy format)')


def is_local_path(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and not _URI.match(os.fspath(path))


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, 'O_DIRECTORY', 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. a directory on a file system that refuses it
        pass
    finally:
        os.close(fd)


PARTIAL_SUFFIX = '.partial-'


def save_checkpoint_file(checkpoint, path) -> None:
    """``torch.save(checkpoint, path)`` so that ``path`` is complete or untouched.

    Writes ``path + '.partial-<pid>'`` beside it, fsyncs and checks its zip
    directory, then ``os.replace``-s it onto ``path`` and fsyncs the folder;
    on any error the partial file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    partial = f'{path}{PARTIAL_SUFFIX}{os.getpid()}'
    _write_atomically(lambda: torch.save(checkpoint, partial), partial, path)


def _write_atomically(write, partial: str, final: str):
    """``write()`` (which writes ``partial``), then fsync, check, rename onto ``final``.

    Returns what ``write`` returned; on any error ``partial`` is removed and
    ``final`` is left as it was.
    """
    try:
        result = write()
        _fsync(partial)
        check_checkpoint_file(partial, crc=False, what='freshly written checkpoint')
        os.replace(partial, final)
    except BaseException:
        if osp.exists(partial):
            try:
                os.remove(partial)
            except OSError:
                pass
        raise
    _fsync(osp.dirname(osp.abspath(final)), directory=True)
    return result


def atomic_save_checkpoint(original):
    """Wrap a Runner's bound ``save_checkpoint`` so a local file appears complete or not at all.

    MMEngine writes ``out_dir/filename`` in place (``open(path, 'wb')``): a
    crash mid-write leaves a truncated file under the final name, and
    ``CheckpointHook`` rewrites the newest checkpoint in place when
    ``save_best`` improves. The wrapper lets MMEngine write
    ``filename + '.partial-<pid>'`` in the same directory, fsyncs it, checks
    its zip directory, then ``os.replace``-s it onto ``filename`` (atomic on
    POSIX and Windows) and fsyncs the directory.
    """
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_checkpoint(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        arguments = bound.arguments
        out_dir, filename = arguments.get('out_dir'), arguments.get('filename')
        if (not is_main_process() or not is_local_path(out_dir) or not isinstance(filename, str)
                or arguments.get('file_client_args') is not None
                or (arguments.get('backend_args') or {}).get('backend', 'local') != 'local'):
            return original(*args, **kwargs)
        final = osp.join(os.fspath(out_dir), filename)
        partial_name = f'{filename}{PARTIAL_SUFFIX}{os.getpid()}'
        partial = osp.join(os.fspath(out_dir), partial_name)
        arguments['filename'] = partial_name
        return _write_atomically(lambda: original(*bound.args, **bound.kwargs), partial, final)

    return save_checkpoint


def checkpoint_to_resume(resume, load_from, work_dir) -> tuple[str | None, str]:
    """The file a Runner with these settings loads, and where its name came from.

    ``resume`` without ``load_from``: the file ``work_dir/last_checkpoint``
    names (``None`` when there is no such record: MMEngine starts from
    scratch). Otherwise ``load_from`` (``None`` when unset).
    """
    if resume and load_from is None:
        record = osp.join(work_dir, 'last_checkpoint')
        if not osp.isfile(record):
            return None, ''  # MMEngine starts from scratch
        with open(record) as f:
            named = f.read().strip()
        if not named:
            raise CheckpointFileError(
                f'{record} is empty, so there is no checkpoint to auto-resume from (it was '
                'being written when the run stopped?). Pass --resume PATH to pick a '
                'checkpoint, or delete the file to start from scratch.')
        return named, f' (named by {record} for auto-resume)'
    if load_from is not None:
        return load_from, ''
    return None, ''


def checkpoint_to_load(runner) -> tuple[str | None, str]:
    """The file ``Runner.load_or_resume`` is about to read, and where its name came from."""
    if runner_has_loaded(runner):
        return None, ''
    return checkpoint_to_resume(runner_resumes(runner), runner_load_from(runner),
                                runner.work_dir)

