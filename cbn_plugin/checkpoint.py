"""Checkpoints that load with ``torch.load(path)`` under ``weights_only=True``.

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
"""
from __future__ import annotations

import collections
from typing import Any

import numpy as np
import torch
from mmengine.config import ConfigDict
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
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


# ---------------------------------------------------------------- hook
class WeightsOnlyCheckpointHook(Hook):
    """Write checkpoints ``torch.load`` accepts with ``weights_only=True``.

    ``before_save_checkpoint`` encodes the checkpoint (see the module
    docstring); ``after_load_checkpoint`` decodes it, and ``Runner.resume``
    calls that before it restores the message hub, optimizer and schedulers.
    Priority ``'LOWEST'``: it encodes after every other hook has added its part.
    (The only other MMEngine/MMDetection hook that touches checkpoints,
    ``EMAHook``, reads and writes tensors only, which are never encoded.)
    """

    priority = 'LOWEST'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        encode_checkpoint(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        decode_checkpoint(checkpoint)


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
