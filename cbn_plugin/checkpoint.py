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

With that, training resumed from an end-of-epoch checkpoint is bit-identical
to the uninterrupted run on the same machine and software
(``tests/test_resume.py``: losses, every parameter, BN/CBN buffer and CBN
window, momentum, and the final RNG states), given what MMEngine needs for
reproducibility anyway (``randomness=dict(seed=..., deterministic=True)``
for CUDA kernels). Not exact, and why:

- multi-process runs: only rank 0 writes the checkpoint (and calls this
  hook's ``before_save_checkpoint``), so the other ranks' states are not in
  it; the hook then restores nothing and warns;
- ``persistent_workers=True`` with ``num_workers > 0`` (MMDetection's
  default): the workers' generators live in the worker processes, which a
  resumed run starts afresh from the seed. ``num_workers=0`` or
  non-persistent workers (re-seeded identically every epoch by MMEngine)
  resume exactly;
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

``dict(type='WeightsOnlyCheckpointHook', restore_rng=False,
check_files=False, atomic_save=False)`` turns the last two parts off.
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
from mmengine.dist import get_world_size, is_main_process
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
    return save_checkpoint


def _checkpoint_to_load(runner) -> tuple[str | None, str]:
    """The file ``Runner.load_or_resume`` is about to read, and where its name came from."""
    if getattr(runner, '_has_loaded', False):
        return None, ''
    resume, load_from = getattr(runner, '_resume', False), getattr(runner, '_load_from', None)
    if resume and load_from is None:
        record = osp.join(runner.work_dir, 'last_checkpoint')
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


# ---------------------------------------------------------------- hook
class WeightsOnlyCheckpointHook(Hook):
    """Weights_only-loadable, atomically written checkpoints that resume exactly.

    - ``before_save_checkpoint`` adds the RNG states (``'rng_state'``, see
      :func:`get_rng_state`) and encodes the checkpoint (module docstring);
      ``after_load_checkpoint`` decodes it, and ``Runner.resume`` calls that
      before it restores the message hub, optimizer and schedulers.
    - ``before_run`` checks the file the Runner is about to load or resume
      (``load_from``, ``--resume PATH``, or the one ``last_checkpoint``
      names) and raises :class:`CheckpointFileError` / ``FileNotFoundError``
      naming it when it is missing, truncated or corrupt
      (:func:`check_checkpoint_file`), and makes the Runner write local
      checkpoints atomically (``_atomic_save_checkpoint``).
    - ``before_train`` restores the saved RNG states when the Runner resumed
      (after everything that seeds or draws at start-up: the Runner's
      seeding, weight init, the checkpoint load). ``before_val``/``after_val``
      put the training RNG state back after each validation, so a run that
      validates draws the same training random numbers as one that does not
      (and as one resumed at that point). A best checkpoint saved during a
      validation stores the training state from before it.

    Priority ``'LOWEST'``: it encodes after every other hook has added its
    part, and restores after every other hook's ``before_train``. (The only
    other MMEngine/MMDetection hook that touches checkpoints, ``EMAHook``,
    reads and writes tensors only, which are never encoded.)

    Args:
        restore_rng: save and restore the RNG states (and isolate
            validations) as above. ``False`` keeps MMEngine's behaviour.
        check_files: check the checkpoint before it is loaded.
        atomic_save: write checkpoints atomically.
    """

    priority = 'LOWEST'

    def __init__(self, restore_rng: bool = True, check_files: bool = True,
                 atomic_save: bool = True) -> None:
        self.restore_rng, self.check_files, self.atomic_save = restore_rng, check_files, atomic_save
        self._loaded_rng = None
        self._val_rng = None

    # -- files
    def before_run(self, runner) -> None:
        if self.check_files:
            path, source = _checkpoint_to_load(runner)
            if path is not None and _local(path):
                check_checkpoint_file(path, note=source)
        if self.atomic_save and not getattr(runner.save_checkpoint, '_cbn_atomic', False):
            runner.save_checkpoint = _atomic_save_checkpoint(runner.save_checkpoint)

    def after_run(self, runner) -> None:
        if getattr(runner.__dict__.get('save_checkpoint'), '_cbn_atomic', False):
            del runner.save_checkpoint  # back to the class's method

    # -- save / load
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.restore_rng and RNG_KEY not in checkpoint:
            # During a validation (a best checkpoint, or save_best re-saving the
            # newest one), the training stream's state is the one from before it.
            checkpoint[RNG_KEY] = self._val_rng if self._val_rng is not None else \
                get_rng_state()
        encode_checkpoint(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        decode_checkpoint(checkpoint)
        meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
        self._loaded_rng = (checkpoint.get(RNG_KEY), meta.get('epoch'), meta.get('iter'))

    # -- RNG
    def before_train(self, runner) -> None:
        loaded, self._loaded_rng = self._loaded_rng, None
        if not self.restore_rng or loaded is None:
            return
        state, epoch, it = loaded
        if not it or (runner.epoch, runner.iter) != (epoch, it):
            return  # load_from (fine-tuning): the checkpoint's progress is not resumed
        if not isinstance(state, dict):
            print_log('WeightsOnlyCheckpointHook: the resumed checkpoint holds no RNG state '
                      '(not written by this hook); random draws after the resume differ '
                      'from an uninterrupted run', logger='current', level=logging.WARNING)
            return
        if get_world_size() > 1 or state.get('world_size', 1) > 1:
            print_log(f'WeightsOnlyCheckpointHook: RNG state not restored: the checkpoint '
                      f'holds rank 0\'s state of a {state.get("world_size", 1)}-process run '
                      f'and this run has {get_world_size()} processes; random draws after '
                      'the resume differ from an uninterrupted run', logger='current',
                      level=logging.WARNING)
            return
        restored = set_rng_state(state)
        if state.get('cuda') and not torch.cuda.is_available():
            print_log('WeightsOnlyCheckpointHook: the checkpoint holds CUDA RNG states but '
                      'CUDA is unavailable; they are not restored', logger='current',
                      level=logging.WARNING)
        print_log(f'WeightsOnlyCheckpointHook: restored the RNG states ({", ".join(restored)}) '
                  f'saved at epoch {epoch}, iter {it}', logger='current')

    def before_val(self, runner) -> None:
        if self.restore_rng:
            self._val_rng = get_rng_state()

    def after_val(self, runner) -> None:
        state, self._val_rng = self._val_rng, None
        if state is not None:
            set_rng_state(state)


def add_weights_only_hook(cfg) -> bool:
    """Append ``dict(type='WeightsOnlyCheckpointHook')`` to ``cfg.custom_hooks``.

    Does nothing when the hook is already listed or the config sets
    ``weights_only_checkpoints = False``. Returns whether it was added.
    """
    if cfg.get('weights_only_checkpoints', True) is False:
        return False
    hooks = list(cfg.get('custom_hooks', None) or [])
    for hook in hooks:
        kind = hook.get('type') if isinstance(hook, dict) else type(hook)
        if kind is WeightsOnlyCheckpointHook or (
                isinstance(kind, str) and kind.split('.')[-1] == 'WeightsOnlyCheckpointHook'):
            return False
    hooks.append(dict(type='WeightsOnlyCheckpointHook'))
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
