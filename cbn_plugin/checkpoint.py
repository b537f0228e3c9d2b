"""Checkpoints that load with ``torch.load(path)`` (``weights_only=True``), are written
atomically, are checked before loading, and resume exactly.

All of it is :class:`WeightsOnlyCheckpointHook`, which ``tools/train.py`` and
``tools/test.py`` add to every config. Three parts: the weights_only
encoding (first below), the RNG state (exact resume) and the file
guarantees (both after the encoding).

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: it only
rebuilds tensors, Python scalars, strings, bytes and the standard containers.
MMEngine 0.10.7 pickles other objects into every checkpoint a Runner writes,
so those checkpoints cannot be loaded, not even by MMEngine itself. Measured
on a real Runner (see ``tests/test_checkpoint.py``), the offenders are:

- ``message_hub.log_scalars[*]``: ``mmengine.logging.HistoryBuffer`` objects
  (each holds two numpy arrays, and its pickle also carries the class's
  table of statistics *functions*);
- ``message_hub.runtime_info``: numpy scalars (``eta``, ``best_score``, which
  is whatever the metric returned, often ``numpy.float64``);
- numpy arrays (and with them ``numpy.dtype`` objects) anywhere a dataset's
  ``metainfo`` holds one, both in ``meta.dataset_meta`` and in
  ``message_hub.runtime_info.dataset_meta``.

(MMDetection's ``CocoDataset`` metainfo, a tuple of class names and a list
of colour tuples, is plain data already.)

Nothing is allow-listed in torch. Instead, :class:`WeightsOnlyCheckpointHook`
rewrites such objects, just before the checkpoint is written, into plain data
that ``weights_only`` accepts, and rewrites them back right after a Runner
loads a checkpoint (``after_load_checkpoint``, which ``Runner.resume`` and
``Runner.load_checkpoint`` call before the message hub, optimizer and
schedulers read the checkpoint). The encoding is a closed set of known types,
so decoding never imports or calls anything named by the file: a checkpoint
stays as safe to load as ``weights_only`` makes it.

Encoded form (version 1). An encoded object is a ``dict`` with the key
``'__cbn_ckpt__'`` naming its type, plus fields:

=====================  =========================================================
``'__cbn_ckpt__'``     fields
=====================  =========================================================
``numpy.ndarray``      ``dtype`` (``numpy.lib.format`` descr), ``shape`` (list),
                       ``data``: a tensor of the same dtype (numeric and bool
                       arrays), a flat list (str/bytes/object arrays, items
                       encoded recursively) or ``bytes`` (any other dtype, raw)
``numpy.generic``      a numpy scalar: ``dtype``, ``data`` (as for an ndarray of
                       shape ``()``)
``numpy.dtype``        ``descr``
``HistoryBuffer``      ``log_history``, ``count_history`` (encoded ndarrays),
                       ``max_length``
``ConfigDict``         ``items`` (a dict)
``frozenset``          ``items`` (a list)
``dict``               ``items``: a plain dict that itself has the key
                       ``'__cbn_ckpt__'`` (escaped, so it never decodes wrongly)
=====================  =========================================================

Everything else passes unchanged: tensors, ``None``, ``bool``, ``int``,
``float``, ``complex``, ``str``, ``bytes``, ``bytearray``, ``torch.dtype``/
``device``/``Size`` and ``dict``/``OrderedDict``/``Counter``/``list``/
``tuple``/``set`` (walked; MMEngine's ``MultiStepLR`` keeps a ``Counter``).
Subtrees with nothing to encode are kept as the very same objects, so a
model ``state_dict`` keeps its ``_metadata``. Any other type is refused at
save time with its path in the checkpoint (``TypeError``), rather than
writing a file that ``torch.load`` would refuse later. The encoded
checkpoint's ``meta['weights_only_format']`` is ``'cbn_plugin/1'``.

Use it through the tools (``tools/train.py`` adds the hook to
``custom_hooks`` when absent) or in a config::

    custom_imports = dict(imports=['cbn_plugin.checkpoint'])
    custom_hooks = [dict(type='WeightsOnlyCheckpointHook')]

A Runner *without* the hook can still read these files (the model weights
and optimizer are plain tensors), but its message hub then receives the
encoded dicts: MMEngine skips the encoded log scalars with a warning and
keeps encoded runtime values such as ``best_score``. So resume with the hook
(``tools/train.py`` always has it). Outside a Runner, :func:`load_checkpoint`
is ``torch.load`` (weights_only) followed by :func:`decode_checkpoint`.

Exact resume
------------
MMEngine saves the model, optimizer, schedulers and message hub, but no
random number generator state: after ``--resume`` the RPN/RoI samplers,
``RandomFlip`` and dropout draw other numbers than the run that was not
interrupted, and the two runs drift apart. The hook saves
``checkpoint['rng_state']`` (:func:`get_rng_state`: python ``random``,
numpy's global generator, torch's CPU generator and, when CUDA is
initialised, every CUDA device's; plain tensors, ints and floats) and
restores it in ``before_train`` of the resumed run: after the Runner's own
seeding (at construction, and again in ``Runner.resume`` when the seed
differs), the weight initialisation and the checkpoint load, and just
before the first epoch's data is drawn, which is where the uninterrupted run
goes on after ``CheckpointHook`` saved in ``after_train_epoch``. Validation
also draws random numbers (the val dataloader's base seed, any random test
transform), and the uninterrupted run validates after the epoch it saved
while the resumed run does not: so the hook puts the training RNG state
back after every validation (``before_val``/``after_val``; a best checkpoint
saved during validation stores the state from before it). Training then
draws the same numbers whether or when it validates. ``load_from`` without
resume (fine-tuning) does not restore anything.

Without a configured seed (MMDetection's default runtime sets none),
MMEngine draws a new seed in every process and gives it to the train
sampler and the data-loading workers when it builds the dataloader, before
``Runner.resume`` reads the checkpoint's seed: ``tools/train.py`` therefore
seeds a resumed Runner with the checkpoint's seed before building it
(:func:`adopt_checkpoint_seed`), and the hook warns at resume when the train
sampler's seed is not the checkpoint's (a Runner built some other way).

Multi-process runs: ``Runner.save_checkpoint`` is ``master_only``, but
``CheckpointHook`` calls it on every rank, so the hook wraps it; in the
wrapper each rank's RNG states and the buffers it keeps for itself (BN running
statistics and CBN windows, see :func:`rank_local_norms`) are gathered to
rank 0, the writer, and stored by rank in ``checkpoint['rank_states']``
(``{'format': 1, 'world_size': W, 'buffers': bool, 'ranks': [...]}``; rank
0's buffers are the ``state_dict``'s). One file, so a checkpoint stays one
atomic write that any storage backend can hold, that is copied or deleted
(``max_keep_ckpts``) as a whole, and whose completeness ``last_checkpoint``
vouches for; the price is the other ranks' window state in rank 0's memory
and in the file (the window buffers of an R50 4conv1fc CBN detector are
about 69 MB per rank). On resume with the same world size each rank puts its
own buffers into the ``state_dict`` before the model loads it and restores
its own RNG states. SyncCBN and SyncBN state is the same on every rank: it
is stored once, plus SyncCBN's shift (the previous global mean) so the
resumed shifted sums are the same numbers. With another world size (or a
multi-process checkpoint without per-rank state) the model and rank 0's
running statistics are restored, the CBN windows restart empty and the RNG
states are not restored, each with a warning.

With that, training resumed from an end-of-epoch checkpoint is bit-identical
to the uninterrupted run on the same machine and software
(``tests/test_resume.py``, ``tests/test_resume_unseeded.py`` without a
seed, ``tests/test_distributed_resume.py`` on 2 processes: losses, every
parameter, BN/CBN buffer and every rank's CBN window, momentum, and the
final RNG states), given ``randomness=dict(deterministic=True)`` for CUDA
kernels. Not exact, and why:

- ``persistent_workers=True`` with ``num_workers > 0`` (MMDetection's
  default): the workers' generators live in the worker processes and carry
  over from epoch to epoch; a resumed run starts them afresh from the seed.
  The hook warns at resume. ``num_workers=0`` or ``persistent_workers=False``
  (MMEngine re-seeds the workers identically every epoch) resume exactly
  (``tests/test_resume_unseeded.py``);
- checkpoints inside an epoch (``by_epoch=False`` in an epoch-based loop):
  MMEngine restarts that epoch's data from its beginning;
- ``IterBasedTrainLoop``: MMEngine skips the trained batches by loading them
  again through the pipeline, which draws random numbers after the restore.

Checkpoint files
----------------
- Written atomically (local paths): the hook wraps the Runner's
  ``save_checkpoint`` so MMEngine writes ``<name>.partial-<pid>`` beside the
  target, then fsyncs, checks its zip directory and ``os.replace``-s it onto
  ``<name>``. A checkpoint file is complete or absent; a crash mid-write
  leaves only the ``.partial-<pid>`` file, which nothing reads (delete it).
  Without this MMEngine writes in place, and since ``CheckpointHook``
  rewrites the newest checkpoint when ``save_best`` improves, a crash there
  truncated the very file ``last_checkpoint`` names.
- ``last_checkpoint`` is written by MMEngine after the checkpoint is
  complete, so it never names a partly written file. Its own (tiny) write is
  not atomic: an empty one stops auto-resume with an error saying so.
  MMEngine deletes the oldest kept checkpoint *before* writing the next one:
  with ``max_keep_ckpts=1`` a crash in between leaves no checkpoint (the
  error names the missing file). Keep at least 2.
- Checked before loading: ``before_run`` (which ``Runner.train``/``val``/
  ``test`` call before ``load_or_resume``) checks the file that is about to
  be read (``load_from``, ``--resume PATH``, or the one ``last_checkpoint``
  names for ``--resume``) with :func:`check_checkpoint_file` and raises
  ``FileNotFoundError`` / :class:`CheckpointFileError` naming it (and the
  ``last_checkpoint`` file that named it) when it is missing, empty,
  truncated, fails a CRC-32 check, or is no checkpoint at all. This reads
  the file once more (the page cache then serves ``torch.load``). URLs and
  other remote paths, and files in torch's pre-1.6 format, are not checked.
- Non-local storage backends are written by MMEngine as before (not
  atomically).

Switches
--------
Each part can be turned off on its own, by a top-level config key
(:func:`add_weights_only_hook`; all ``True`` unless set ``False``) or the
hook's argument: ``weights_only_checkpoints`` (``encode``),
``resume_rng_state`` (``restore_rng``, with the seed adoption),
``resume_rank_states`` (``rank_states``), ``atomic_checkpoints``
(``atomic_save``), ``check_checkpoint_files`` (``check_files``).
"""
from __future__ import annotations

import collections
import functools
import inspect
import logging
import os
import os.path as osp
import random
import re
import zipfile
from typing import Any

import numpy as np
import torch
from mmengine.config import ConfigDict
from mmengine.dist import get_rank, get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer, print_log
from mmengine.registry import HOOKS

TAG = '__cbn_ckpt__'
FORMAT = 'cbn_plugin/1'
FORMAT_KEY = 'weights_only_format'

_ATOMS = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype,
          torch.device, torch.Size)
_WALKED_DICTS = (dict, collections.OrderedDict, collections.Counter)
_WALKED_SEQUENCES = (list, tuple, set)
# numpy dtypes that map one to one onto a torch dtype (torch.from_numpy).
_TENSOR_KINDS = 'biufc'


def _key_ok(key) -> bool:
    if isinstance(key, tuple):
        return all(_key_ok(k) for k in key)
    return type(key) in _ATOMS


# ---------------------------------------------------------------- numpy
def _encode_array(arr: np.ndarray, path: str) -> dict:
    dtype = arr.dtype
    out = {'dtype': np.lib.format.dtype_to_descr(dtype), 'shape': list(arr.shape)}
    if dtype.kind in _TENSOR_KINDS and dtype.isnative and dtype.names is None:
        try:
            # (np.ascontiguousarray would turn a 0-d array into a 1-d one.)
            contiguous = arr if arr.flags.c_contiguous else arr.copy(order='C')
            out['data'] = torch.from_numpy(contiguous).clone()
            return out
        except TypeError:  # a numpy dtype torch has no match for
            pass
    if dtype.kind in 'USO':
        out['data'] = [_encode(v, f'{path}.flat[{i}]')
                       for i, v in enumerate(arr.reshape(-1).tolist())]
    else:
        out['data'] = arr.tobytes(order='C')
    return out


def _decode_array(enc: dict) -> np.ndarray:
    dtype = np.lib.format.descr_to_dtype(enc['dtype'])
    shape = tuple(enc['shape'])
    data = enc['data']
    if isinstance(data, torch.Tensor):
        arr = data.numpy().copy()
    elif isinstance(data, list):
        arr = np.empty(len(data), dtype=dtype)
        for i, v in enumerate(data):
            arr[i] = _decode(v)
    else:
        arr = np.frombuffer(bytes(data), dtype=dtype).copy()
    return arr.astype(dtype, copy=False).reshape(shape)


# ---------------------------------------------------------------- walk
def _encode(obj: Any, path: str) -> Any:
    """``obj`` in encoded form; ``obj`` itself when nothing needed encoding."""
    kind = type(obj)
    if kind in _ATOMS or isinstance(obj, torch.Tensor):
        return obj
    if kind in _WALKED_DICTS:
        bad = [k for k in obj if not _key_ok(k)]
        if bad:
            raise TypeError(f'{path} has a key of type {type(bad[0]).__name__} ({bad[0]!r}); '
                            'torch.load(weights_only=True) cannot rebuild it')
        items = {k: _encode(v, f'{path}[{k!r}]') for k, v in obj.items()}
        if kind is dict and TAG in obj:
            return {TAG: 'dict', 'items': items}
        if all(items[k] is obj[k] for k in obj):
            return obj
        new = kind(items) if kind is not collections.OrderedDict else collections.OrderedDict(
            items)
        if hasattr(obj, '_metadata'):  # an nn.Module state_dict's version table
            new._metadata = obj._metadata
        return new
    if kind in _WALKED_SEQUENCES:
        items = [_encode(v, f'{path}[{i}]') for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return kind(items)
    if isinstance(obj, np.ndarray) and kind is np.ndarray:
        return {TAG: 'numpy.ndarray', **_encode_array(obj, path)}
    if isinstance(obj, np.generic):
        arr = _encode_array(np.asarray(obj), path)
        return {TAG: 'numpy.generic', 'dtype': arr['dtype'], 'data': arr['data']}
    if isinstance(obj, np.dtype):
        return {TAG: 'numpy.dtype', 'descr': np.lib.format.dtype_to_descr(obj)}
    if kind is frozenset:
        return {TAG: 'frozenset', 'items': [_encode(v, f'{path}[{i}]')
                                            for i, v in enumerate(obj)]}
    if kind is HistoryBuffer:
        log, count = obj.data
        return {TAG: 'HistoryBuffer', 'max_length': int(obj.max_length),
                'log_history': _encode(log, f'{path}.log_history'),
                'count_history': _encode(count, f'{path}.count_history')}
    if kind is ConfigDict:
        return {TAG: 'ConfigDict',
                'items': _encode(obj.to_dict(), path)}
    raise TypeError(
        f'{path} is a {kind.__module__}.{kind.__qualname__}, which '
        'torch.load(weights_only=True) refuses and cbn_plugin.checkpoint has no encoding '
        'for. Store it as plain data (tensors, numbers, strings, lists, dicts) instead.')


def _decode(obj: Any) -> Any:
    """Inverse of :func:`_encode`; ``obj`` itself when nothing was encoded."""
    kind = type(obj)
    if kind in _WALKED_DICTS:
        if kind is dict and isinstance(obj.get(TAG), str):
            return _decode_tagged(obj)
        items = {k: _decode(v) for k, v in obj.items()}
        if all(items[k] is obj[k] for k in obj):
            return obj
        new = kind(items) if kind is not collections.OrderedDict else collections.OrderedDict(
            items)
        if hasattr(obj, '_metadata'):
            new._metadata = obj._metadata
        return new
    if kind in _WALKED_SEQUENCES:
        items = [_decode(v) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return kind(items)
    return obj


def _decode_tagged(enc: dict) -> Any:
    tag = enc[TAG]
    if tag == 'numpy.ndarray':
        return _decode_array(enc)
    if tag == 'numpy.generic':
        return _decode_array(dict(enc, shape=[]))[()]
    if tag == 'numpy.dtype':
        return np.lib.format.descr_to_dtype(enc['descr'])
    if tag == 'frozenset':
        return frozenset(_decode(v) for v in enc['items'])
    if tag == 'dict':
        return {k: _decode(v) for k, v in enc['items'].items()}
    if tag == 'HistoryBuffer':
        buffer = HistoryBuffer(max_length=enc['max_length'])
        buffer._log_history = _decode(enc['log_history'])
        buffer._count_history = _decode(enc['count_history'])
        return buffer
    if tag == 'ConfigDict':
        return ConfigDict(_decode(enc['items']))
    raise ValueError(f'checkpoint holds an object encoded as {tag!r}, which this version of '
                     f'cbn_plugin.checkpoint (format {FORMAT}) does not know')


# ---------------------------------------------------------------- public API
def encode(obj: Any, path: str = 'obj') -> Any:
    """``obj`` with every non-weights_only object replaced by its encoded form.

    Unchanged subtrees are returned as the same objects (not copies).
    Raises ``TypeError`` naming the path of an object it cannot encode.
    """
    return _encode(obj, path)


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`."""
    return _decode(obj)


def encode_checkpoint(checkpoint: dict) -> dict:
    """Encode a Runner checkpoint in place (and return it); see the module doc."""
    for key in list(checkpoint):
        checkpoint[key] = _encode(checkpoint[key], f'checkpoint[{key!r}]')
    meta = checkpoint.get('meta')
    if isinstance(meta, dict):
        meta[FORMAT_KEY] = FORMAT
    return checkpoint


def decode_checkpoint(checkpoint: dict) -> dict:
    """Decode a checkpoint written by :func:`encode_checkpoint`, in place.

    A checkpoint without encoded objects is returned unchanged.
    """
    for key in list(checkpoint):
        checkpoint[key] = _decode(checkpoint[key])
    meta = checkpoint.get('meta')
    if isinstance(meta, dict):
        meta.pop(FORMAT_KEY, None)
    return checkpoint


def load_checkpoint(filename, map_location=None) -> dict:
    """``torch.load(filename, map_location)`` (weights_only) and decode."""
    return decode_checkpoint(torch.load(filename, map_location=map_location))


# ---------------------------------------------------------------- RNG state
RNG_KEY = 'rng_state'
RNG_FORMAT = 1


def get_rng_state() -> dict:
    """This process's random number generator states, as weights_only-safe plain data.

    Python's ``random``, NumPy's global ``RandomState``, torch's CPU
    generator and, when CUDA is initialised, every CUDA device's generator.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        'format': RNG_FORMAT,
        'world_size': get_world_size(),
        'torch': torch.get_rng_state(),
        'numpy': {'kind': str(kind), 'keys': torch.from_numpy(keys.astype(np.int64)),
                  'pos': int(pos), 'has_gauss': int(has_gauss),
                  'cached_gaussian': float(cached_gaussian)},
        'random': {'version': int(version), 'internal': torch.tensor(internal, dtype=torch.int64),
                   'gauss_next': None if gauss_next is None else float(gauss_next)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> list[str]:
    """Restore what :func:`get_rng_state` returned; returns the generators restored.

    CUDA states are restored for the devices both the state and this process
    have (a CPU-only process skips them).
    """
    if state.get('format') != RNG_FORMAT:
        raise ValueError(f'RNG state of format {state.get("format")!r}; this version of '
                         f'cbn_plugin.checkpoint reads format {RNG_FORMAT}')
    torch.set_rng_state(state['torch'])
    npy = state['numpy']
    np.random.set_state((npy['kind'], npy['keys'].numpy().astype(np.uint32), npy['pos'],
                         npy['has_gauss'], npy['cached_gaussian']))
    rnd = state['random']
    random.setstate((rnd['version'], tuple(rnd['internal'].tolist()), rnd['gauss_next']))
    restored = ['torch', 'numpy', 'random']
    cuda = state.get('cuda') or []
    if cuda and torch.cuda.is_available():
        for device in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[device], device)
        restored.append(f'cuda x{min(len(cuda), torch.cuda.device_count())}')
    return restored


# ---------------------------------------------------------------- checkpoint files
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


def _local(path) -> bool:
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


def _atomic_save_checkpoint(original):
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
        if (not is_main_process() or not _local(out_dir) or not isinstance(filename, str)
                or arguments.get('file_client_args') is not None
                or (arguments.get('backend_args') or {}).get('backend', 'local') != 'local'):
            return original(*args, **kwargs)
        final = osp.join(os.fspath(out_dir), filename)
        partial_name = f'{filename}{PARTIAL_SUFFIX}{os.getpid()}'
        partial = osp.join(os.fspath(out_dir), partial_name)
        arguments['filename'] = partial_name
        try:
            result = original(*bound.args, **bound.kwargs)
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
        _fsync(osp.dirname(final) or '.', directory=True)
        return result

    save_checkpoint._cbn_atomic = True
    save_checkpoint._cbn_wrapped = True
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


def _checkpoint_to_load(runner) -> tuple[str | None, str]:
    """The file ``Runner.load_or_resume`` is about to read, and where its name came from."""
    if getattr(runner, '_has_loaded', False):
        return None, ''
    return checkpoint_to_resume(getattr(runner, '_resume', False),
                                getattr(runner, '_load_from', None), runner.work_dir)


# ---------------------------------------------------------------- the run's seed
def read_checkpoint_meta(path) -> dict:
    """``meta`` of a checkpoint file, decoded; the tensors are memory-mapped, not read."""
    try:
        checkpoint = torch.load(path, map_location='cpu', mmap=True)
    except RuntimeError:  # torch's pre-1.6 format cannot be memory-mapped
        checkpoint = torch.load(path, map_location='cpu')
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    return decode(meta) if isinstance(meta, dict) else {}


def adopt_checkpoint_seed(cfg) -> int | None:
    """Make a resumed run use the seed of the run it resumes; returns the seed adopted.

    With no ``randomness.seed`` in the config (MMDetection's default), MMEngine
    draws a seed in ``Runner.__init__`` and gives it, when the dataloaders are
    built, to the train sampler (the shuffle of every epoch) and to the
    data-loading workers (``worker_init_fn``). ``Runner.resume`` reads the
    checkpoint's seed only after that, so a resumed run shuffles the rest of
    training with another seed. Called before the Runner is built (by
    ``tools/train.py`` through ``build_runner``), this sets
    ``cfg.randomness.seed`` to ``checkpoint['meta']['seed']`` when the config
    resumes (``cfg.resume``) and sets no seed itself; the Runner is then
    seeded exactly like the run it continues.

    A configured seed is kept; when it differs from the checkpoint's a
    warning says that the data order then differs. Nothing is adopted (with a
    warning) for a remote checkpoint or one without a seed; a missing or
    damaged file is left for the Runner to report by name.
    """
    if not cfg.get('resume', False):
        return None
    path, source = checkpoint_to_resume(True, cfg.get('load_from', None), cfg.work_dir)
    if path is None:
        return None
    randomness = dict(cfg.get('randomness', None) or {})
    configured = randomness.get('seed', None)
    if not _local(path):
        if configured is None:
            print_log(f'adopt_checkpoint_seed: cannot read the seed of the remote checkpoint '
                      f'{path}{source}; the resumed run draws a new seed, so its data order '
                      'differs from the uninterrupted run. Set randomness.seed to the seed '
                      "logged by the first run for an exact resume", logger='current',
                      level=logging.WARNING)
        return None
    try:
        check_checkpoint_file(path, crc=False, note=source)
    except (FileNotFoundError, CheckpointFileError):
        return None  # WeightsOnlyCheckpointHook (or MMEngine) reports it when loading
    seed = read_checkpoint_meta(path).get('seed', None)
    if seed is None:
        print_log(f'adopt_checkpoint_seed: checkpoint {path}{source} records no seed (not '
                  'written by an MMEngine Runner?); the resumed run uses '
                  f'{"its configured seed" if configured is not None else "a new seed"}',
                  logger='current', level=logging.WARNING)
        return None
    if configured is not None:
        if int(configured) != int(seed):
            print_log(f'adopt_checkpoint_seed: randomness.seed={configured} but checkpoint '
                      f'{path}{source} was written by a run seeded with {seed}: the resumed '
                      'run shuffles its data (and seeds its workers) with the configured seed, '
                      'unlike the run it continues', logger='current', level=logging.WARNING)
        return None
    randomness['seed'] = int(seed)
    cfg.randomness = randomness
    print_log(f'adopt_checkpoint_seed: adopted seed {seed} from checkpoint {path}{source} '
              '(the config sets no randomness.seed)', logger='current')
    return int(seed)


# ---------------------------------------------------------------- per-rank state
RANK_STATES_KEY = 'rank_states'
RANK_STATES_FORMAT = 1


def _unwrap(model):
    from mmengine.model import is_model_wrapper
    return model.module if is_model_wrapper(model) else model


def _is_sync_norm(module) -> bool:
    """Norms whose statistics are reduced over the process group: identical on every rank."""
    from .layer import SyncCrossIterationBatchNorm2d
    if isinstance(module, (torch.nn.SyncBatchNorm, SyncCrossIterationBatchNorm2d)):
        return True
    try:
        from mmcv.ops import SyncBatchNorm as MMCVSyncBatchNorm
    except ImportError:  # mmcv without its compiled ops
        return False
    return isinstance(module, MMCVSyncBatchNorm)


def rank_local_norms(model) -> dict[str, torch.nn.Module]:
    """``{name: module}`` of the norms whose buffers each rank keeps for itself.

    Every ``_BatchNorm`` subclass (BN, CBN) that is not a synchronised one:
    DDP with ``broadcast_buffers=False`` (MMEngine's default wrapper, and
    ``tools/train.py``'s on CPU) leaves each rank its own running statistics
    and, for CBN, its own window of its own batches.
    """
    from torch.nn.modules.batchnorm import _BatchNorm
    return {name: m for name, m in _unwrap(model).named_modules()
            if isinstance(m, _BatchNorm) and not _is_sync_norm(m)}


def rank_local_buffers(model) -> dict[str, torch.Tensor]:
    """This rank's buffers of :func:`rank_local_norms`, as CPU copies keyed like ``state_dict``."""
    out = {}
    for name, module in rank_local_norms(model).items():
        prefix = f'{name}.' if name else ''
        for key, value in module.named_buffers(recurse=False):
            if key in module._non_persistent_buffers_set:
                continue
            out[prefix + key] = value.detach().to('cpu', copy=True)
    return out


def _sync_shifts(model) -> dict[str, torch.Tensor]:
    """SyncCBN's shift (the previous global mean; the same on every rank), by layer name."""
    from .layer import SyncCrossIterationBatchNorm2d
    return {name: m._shift.detach().to('cpu', copy=True)
            for name, m in _unwrap(model).named_modules()
            if isinstance(m, SyncCrossIterationBatchNorm2d) and getattr(m, '_shift', None)
            is not None}


def _gather_to_writer(local: dict) -> list | None:
    """Every rank's ``local`` on rank 0 (a list by rank), ``None`` elsewhere."""
    import torch.distributed as dist
    if get_world_size() == 1:
        return [local]
    gathered = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    return gathered


def empty_cbn_windows(state_dict: dict, model) -> list[str]:
    """Empty the windows of the (not synchronised) CBN layers in ``state_dict``, in place.

    The step counters stay (the burn-in clock goes on); ``window_filled`` and
    ``window_next`` become 0 and the entries 0, so the layer pools nothing
    from the past until new steps are recorded. Returns the layer names.
    """
    from .layer import CrossIterationBatchNorm2d
    names = []
    for name, module in rank_local_norms(model).items():
        if not isinstance(module, CrossIterationBatchNorm2d):
            continue
        prefix = f'{name}.' if name else ''
        touched = False
        for key in ('window_next', 'window_filled', 'window_mean', 'window_var',
                    'window_grad_mean', 'window_grad_var'):
            value = state_dict.get(prefix + key)
            if isinstance(value, torch.Tensor):
                state_dict[prefix + key] = torch.zeros_like(value)
                touched = True
        if touched:
            names.append(name)
    return names


# ---------------------------------------------------------------- hook
class WeightsOnlyCheckpointHook(Hook):
    """Weights_only-loadable, atomically written checkpoints that resume exactly.

    Each part has its own switch (constructor argument, and the top-level
    config key :func:`add_weights_only_hook` maps onto it):

    - ``encode`` (``weights_only_checkpoints``): ``before_save_checkpoint``
      encodes the checkpoint so plain ``torch.load`` (``weights_only=True``)
      reads it, and ``after_load_checkpoint`` decodes it (module docstring).
      Decoding is always on: it only changes what was encoded.
    - ``restore_rng`` (``resume_rng_state``): every rank's RNG states are
      saved (``checkpoint['rng_state']`` is rank 0's,
      ``checkpoint['rank_states']['ranks'][r]['rng_state']`` rank r's) and
      restored by each rank in ``before_train`` of a resumed run of the same
      world size; validations are kept out of the training stream
      (``before_val``/``after_val``). A best checkpoint saved during a
      validation stores the training state from before it.
    - ``rank_states`` (``resume_rank_states``): the buffers each rank keeps
      for itself (:func:`rank_local_norms`: BN running statistics and CBN
      windows under ``broadcast_buffers=False``) are gathered from every rank
      to the writer and stored by rank; on resume each rank loads its own
      into the model. SyncCBN/SyncBN state is identical on every rank and is
      stored once (the model's ``state_dict``), plus SyncCBN's shift.
      Resuming with another world size, or from a multi-process checkpoint
      without per-rank state, loads rank 0's model and *empties* the CBN
      windows with a warning (statistics of another device's batches cannot
      stand in for this device's).
    - ``check_files`` (``check_checkpoint_files``): ``before_run`` checks the
      file the Runner is about to load or resume (``load_from``,
      ``--resume PATH``, or the one ``last_checkpoint`` names) and raises
      :class:`CheckpointFileError` / ``FileNotFoundError`` naming it when it
      is missing, truncated or corrupt (:func:`check_checkpoint_file`).
    - ``atomic_save`` (``atomic_checkpoints``): local checkpoints are written
      atomically (``_atomic_save_checkpoint``).

    Priority ``'LOWEST'``: it encodes after every other hook has added its
    part, and restores after every other hook's ``before_train``. (The only
    other MMEngine/MMDetection hook that touches checkpoints, ``EMAHook``,
    reads and writes tensors only, which are never encoded.)
    """

    priority = 'LOWEST'

    def __init__(self, restore_rng: bool = True, check_files: bool = True,
                 atomic_save: bool = True, encode: bool = True,
                 rank_states: bool = True) -> None:
        for name, value in dict(restore_rng=restore_rng, check_files=check_files,
                                atomic_save=atomic_save, encode=encode,
                                rank_states=rank_states).items():
            if not isinstance(value, bool):
                raise ValueError(f'WeightsOnlyCheckpointHook {name} must be True or False, '
                                 f'got {value!r}')
        self.restore_rng, self.check_files, self.atomic_save = restore_rng, check_files, atomic_save
        self.encode, self.rank_states = encode, rank_states
        self._loaded_rng = None
        self._loaded_seed = None
        self._loaded_shifts = None
        self._val_rng = None
        self._gathered = None

    # -- files
    def before_run(self, runner) -> None:
        if self.check_files:
            path, source = _checkpoint_to_load(runner)
            if path is not None and _local(path):
                check_checkpoint_file(path, note=source)
        if getattr(runner.save_checkpoint, '_cbn_wrapped', False):
            return
        save = original = runner.save_checkpoint
        if self.atomic_save:
            save = _atomic_save_checkpoint(save)
        if (self.restore_rng or self.rank_states) and get_world_size() > 1:
            save = self._gathering_save_checkpoint(save, runner)
        if save is not original:
            save._cbn_wrapped = True
            runner.save_checkpoint = save

    def after_run(self, runner) -> None:
        if getattr(runner.__dict__.get('save_checkpoint'), '_cbn_wrapped', False):
            del runner.save_checkpoint  # back to the class's method

    # -- save / load
    def _local_state(self, runner) -> dict:
        """What this rank adds to a checkpoint: its RNG states and own norm buffers."""
        local = {}
        if self.restore_rng:
            # During a validation (a best checkpoint, or save_best re-saving the
            # newest one), the training stream's state is the one from before it.
            local['rng_state'] = self._val_rng if self._val_rng is not None else \
                get_rng_state()
        if self.rank_states and get_world_size() > 1:
            local['buffers'] = rank_local_buffers(runner.model)
            local['sync_shifts'] = _sync_shifts(runner.model)
        return local

    def _gathering_save_checkpoint(self, original, runner):
        """Wrap ``Runner.save_checkpoint`` to gather every rank's state to rank 0 first.

        ``Runner.save_checkpoint`` is ``master_only``: on the other ranks it
        returns at once and ``before_save_checkpoint`` never runs there. But
        ``CheckpointHook`` (the only caller in MMEngine and MMDetection) calls
        it on every rank, so the wrapper is where all ranks meet.
        """
        @functools.wraps(original)
        def save_checkpoint(*args, **kwargs):
            self._gathered = _gather_to_writer(self._local_state(runner))
            try:
                return original(*args, **kwargs)
            finally:
                self._gathered = None

        return save_checkpoint

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # Rank 0 only (Runner.save_checkpoint is master_only).
        gathered, self._gathered = self._gathered, None
        if gathered is None and (self.restore_rng or self.rank_states):
            if get_world_size() > 1:
                print_log('WeightsOnlyCheckpointHook: a checkpoint saved on rank 0 alone (not '
                          'through CheckpointHook, whose call every rank makes): it holds rank '
                          "0's state only, and a resume from it restarts the CBN windows empty",
                          logger='current', level=logging.WARNING)
            local = self._local_state(runner)
            local.pop('buffers', None)
            local.pop('sync_shifts', None)
            gathered = [local]
        if gathered is not None:
            if self.restore_rng and RNG_KEY not in checkpoint:
                checkpoint[RNG_KEY] = gathered[0]['rng_state']
            if len(gathered) > 1:
                gathered[0].pop('buffers', None)  # rank 0's are the state_dict's
                checkpoint[RANK_STATES_KEY] = {
                    'format': RANK_STATES_FORMAT, 'world_size': len(gathered),
                    'buffers': self.rank_states, 'ranks': gathered}
        if self.encode:
            encode_checkpoint(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        decode_checkpoint(checkpoint)
        meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
        self._loaded_seed = meta.get('seed')
        progress = (meta.get('epoch'), meta.get('iter'))
        rng_state = checkpoint.get(RNG_KEY)
        if not getattr(runner, '_resume', False):
            # load_from (fine-tuning, testing): rank 0's model, nothing else.
            self._loaded_rng = (rng_state, *progress)
            return
        world, rank = get_world_size(), get_rank()
        saved = checkpoint.get(RANK_STATES_KEY)
        if saved is not None:
            if not isinstance(saved, dict) or saved.get('format') != RANK_STATES_FORMAT:
                found = saved.get('format') if isinstance(saved, dict) else type(saved).__name__
                raise ValueError(f'checkpoint[{RANK_STATES_KEY!r}] has format {found!r}; this '
                                 'version of cbn_plugin.checkpoint reads format '
                                 f'{RANK_STATES_FORMAT}')
            saved_world = saved['world_size']
        elif isinstance(rng_state, dict):
            saved_world = rng_state.get('world_size', 1)
        else:
            saved_world = None  # not written by this hook
        mine = saved['ranks'][rank] if saved is not None and saved_world == world else None
        if saved is not None:
            self._loaded_shifts = saved['ranks'][0].get('sync_shifts')

        single = world == 1 and saved_world in (None, 1)
        if single:
            why = None
        elif saved_world is None:
            why = 'holds no record of the world size it was written with'
        elif saved_world != world:
            why = f'was written by {saved_world} processes and this run has {world}'
        else:
            why = None if mine is not None else (
                f"holds only rank 0's state of a {saved_world}-process run")

        state_dict = checkpoint.get('state_dict')
        if not isinstance(state_dict, dict):
            state_dict = {}
        if mine is not None and saved.get('buffers'):
            if rank != 0:
                self._use_rank_buffers(runner.model, state_dict, mine['buffers'])
        elif not single:
            # Rank 0's windows are all the checkpoint has for this run: every rank
            # would pool another device's (or another layout's) batches.
            emptied = empty_cbn_windows(state_dict, runner.model)
            if emptied:
                what = why or (f'of a {saved_world}-process run was written without each '
                               "rank's norm buffers (resume_rank_states=False)")
                print_log(f'WeightsOnlyCheckpointHook: the checkpoint {what}: the model '
                          "(parameters, rank 0's running statistics) is restored, but the "
                          f'windows of {len(emptied)} CBN layers restart empty (statistics of '
                          "other devices' batches cannot be compensated to this device's; "
                          'step counters and burn-in go on). Training continues, but not as '
                          'it would have without the interruption', logger='current',
                          level=logging.WARNING)
        if mine is not None:
            rng_state = mine.get('rng_state')
        elif not single:
            rng_state = f'the checkpoint {why}'
        self._loaded_rng = (rng_state, *progress)

    @staticmethod
    def _use_rank_buffers(model, state_dict: dict, buffers: dict) -> None:
        """Put this rank's own norm buffers into the ``state_dict`` the model loads."""
        for name, module in rank_local_norms(model).items():
            prefix = f'{name}.' if name else ''
            for key in module._buffers:
                if prefix + key not in buffers:
                    state_dict.pop(prefix + key, None)  # None on this rank (no step yet)
        state_dict.update(buffers)

    # -- RNG
    def before_train(self, runner) -> None:
        self._check_kept_checkpoints(runner)
        loaded, self._loaded_rng = self._loaded_rng, None
        shifts, self._loaded_shifts = self._loaded_shifts, None
        seed, self._loaded_seed = self._loaded_seed, None
        if loaded is None:
            return
        state, epoch, it = loaded
        if not it or (runner.epoch, runner.iter) != (epoch, it):
            return  # load_from (fine-tuning): the checkpoint's progress is not resumed
        self._check_resumed_data_order(runner, seed)
        if shifts:
            from .layer import SyncCrossIterationBatchNorm2d
            model = _unwrap(runner.model)
            for name, module in model.named_modules():
                if isinstance(module, SyncCrossIterationBatchNorm2d) and name in shifts:
                    device = module._state_device()
                    module._shift = shifts[name].to(device)
        if not self.restore_rng:
            return
        loop = runner.train_loop
        replayed = getattr(loop, '_iter', 0) if hasattr(loop, 'dataloader_iterator') else 0
        if replayed > 0:
            # IterBasedTrainLoop pushes the `replayed` batches it skips through the
            # pipeline after this hook, drawing random augmentation (RandomFlip) as
            # it goes; the uninterrupted run's state was saved after those batches.
            # So restore once the replay is done, before the first new batch.
            loop.dataloader_iterator = _RestoreAfter(
                loop.dataloader_iterator, replayed,
                lambda: self._restore_rng_state(state, epoch, it))
            return
        self._restore_rng_state(state, epoch, it)

    @staticmethod
    def _restore_rng_state(state, epoch: int, it: int) -> None:
        if isinstance(state, str):
            print_log(f'WeightsOnlyCheckpointHook: RNG states not restored: {state}; random '
                      'draws after the resume differ from an uninterrupted run',
                      logger='current', level=logging.WARNING)
            return
        if not isinstance(state, dict):
            print_log('WeightsOnlyCheckpointHook: the resumed checkpoint holds no RNG state '
                      '(not written by this hook); random draws after the resume differ '
                      'from an uninterrupted run', logger='current', level=logging.WARNING)
            return
        restored = set_rng_state(state)
        if state.get('cuda') and not torch.cuda.is_available():
            print_log('WeightsOnlyCheckpointHook: the checkpoint holds CUDA RNG states but '
                      'CUDA is unavailable; they are not restored', logger='current',
                      level=logging.WARNING)
        where = f' (rank {get_rank()} of {get_world_size()})' if get_world_size() > 1 else ''
        print_log(f'WeightsOnlyCheckpointHook: restored the RNG states ({", ".join(restored)}) '
                  f'saved at epoch {epoch}, iter {it}{where}', logger='current')

    @staticmethod
    def _check_kept_checkpoints(runner) -> None:
        from mmengine.hooks import CheckpointHook
        for hook in runner.hooks:
            if isinstance(hook, CheckpointHook) and getattr(hook, 'max_keep_ckpts', -1) == 1:
                print_log('WeightsOnlyCheckpointHook: CheckpointHook max_keep_ckpts=1: MMEngine '
                          'deletes the only kept checkpoint before it writes the next one, so '
                          'a crash during that write leaves no checkpoint to resume from. Use '
                          'max_keep_ckpts >= 2 (or -1, keep all)', logger='current',
                          level=logging.WARNING)

    @staticmethod
    def _check_resumed_data_order(runner, seed) -> None:
        """Warn about what a resume cannot reproduce in the training data's randomness."""
        loader = runner.train_dataloader
        sampler = getattr(getattr(loader, 'batch_sampler', None), 'sampler', None)
        if not hasattr(sampler, 'seed'):
            sampler = getattr(loader, 'sampler', None)
        sampler_seed = getattr(sampler, 'seed', None)
        if seed is not None and sampler_seed is not None and int(sampler_seed) != int(seed):
            print_log(f'WeightsOnlyCheckpointHook: the train sampler shuffles with seed '
                      f'{sampler_seed}, but the checkpoint was written by a run seeded with '
                      f'{seed}: the data order after the resume differs from an uninterrupted '
                      f'run. Set randomness.seed={seed} in the config (tools/train.py does '
                      'this itself when the config sets no seed: '
                      'cbn_plugin.checkpoint.adopt_checkpoint_seed)', logger='current',
                      level=logging.WARNING)
        workers = getattr(loader, 'num_workers', 0)
        if workers > 0 and getattr(loader, 'persistent_workers', False):
            print_log(f'WeightsOnlyCheckpointHook: train_dataloader.persistent_workers=True '
                      f'with num_workers={workers}: the uninterrupted run\'s worker processes '
                      'carry their random generators (data augmentation such as RandomFlip) '
                      'from one epoch into the next, while the resumed run\'s workers start '
                      'from the seed again, so the augmentation drawn after the resume '
                      'differs. For an exact resume set persistent_workers=False (MMEngine '
                      'then re-seeds the workers identically every epoch) or num_workers=0',
                      logger='current', level=logging.WARNING)

    def before_val(self, runner) -> None:
        if self.restore_rng:
            self._val_rng = get_rng_state()

    def after_val(self, runner) -> None:
        state, self._val_rng = self._val_rng, None
        if state is not None:
            set_rng_state(state)



class _RestoreAfter:
    """An iterator that calls ``callback`` once, after its first ``count`` items."""

    def __init__(self, iterator, count: int, callback) -> None:
        self._iterator, self._left, self._callback = iterator, count, callback

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._iterator)
        if self._left > 0:
            self._left -= 1
            if self._left == 0:
                self._callback()
        return item

# Top-level config keys -> WeightsOnlyCheckpointHook arguments (all default True).
CONFIG_SWITCHES = {
    'weights_only_checkpoints': 'encode',
    'resume_rng_state': 'restore_rng',
    'resume_rank_states': 'rank_states',
    'atomic_checkpoints': 'atomic_save',
    'check_checkpoint_files': 'check_files',
}


def add_weights_only_hook(cfg) -> bool:
    """Append ``dict(type='WeightsOnlyCheckpointHook', ...)`` to ``cfg.custom_hooks``.

    The hook's parts follow the config's top-level switches (each ``True``
    unless the config sets it ``False``):

    =============================  ===============================================
    ``weights_only_checkpoints``   encode checkpoints so ``torch.load``'s default
                                   ``weights_only=True`` reads them
    ``resume_rng_state``           save every rank's RNG states and restore them on
                                   resume (and adopt the checkpoint's seed in
                                   ``tools/train.py`` when the config sets none)
    ``resume_rank_states``         save every rank's own norm buffers (CBN windows,
                                   BN running statistics) and restore each rank's
    ``atomic_checkpoints``         write checkpoint files atomically
    ``check_checkpoint_files``     check a checkpoint file before loading it
    =============================  ===============================================

    Nothing is added when the hook is already listed; a switch set in the
    config that contradicts the listed hook's own argument is an error.
    Raises ``ValueError`` for a switch that is not ``True``/``False``.
    Returns whether the hook was added.
    """
    args = {}
    for key, arg in CONFIG_SWITCHES.items():
        value = cfg.get(key, True)
        if not isinstance(value, bool):
            raise ValueError(f'config {key}={value!r}: must be True or False '
                             f'(WeightsOnlyCheckpointHook {arg}=...)')
        if value is False:
            args[arg] = False
    hooks = list(cfg.get('custom_hooks', None) or [])
    for hook in hooks:
        kind = hook.get('type') if isinstance(hook, dict) else type(hook)
        if kind is WeightsOnlyCheckpointHook or (
                isinstance(kind, str) and kind.split('.')[-1] == 'WeightsOnlyCheckpointHook'):
            for key, arg in CONFIG_SWITCHES.items():
                listed = hook.get(arg, True) if isinstance(hook, dict) else getattr(hook, arg)
                if key in cfg and cfg[key] != listed:
                    raise ValueError(
                        f'config {key}={cfg[key]!r} contradicts the '
                        f'WeightsOnlyCheckpointHook listed in custom_hooks ({arg}={listed!r}): '
                        'set it in one place')
            return False
    hooks.append(dict(type='WeightsOnlyCheckpointHook', **args))
    cfg.custom_hooks = hooks
    return True


def register() -> None:
    """Register ``'WeightsOnlyCheckpointHook'`` in MMEngine's root ``HOOKS`` (idempotent).

    Every OpenMMLab scope (mmdet) searches this root registry too.
    """
    if HOOKS.module_dict.get('WeightsOnlyCheckpointHook') is not WeightsOnlyCheckpointHook:
        HOOKS.register_module('WeightsOnlyCheckpointHook', module=WeightsOnlyCheckpointHook,
                              force=True)


register()
