"""The weights_only encoding: MMEngine's non-tensor checkpoint objects as plain data.

MMEngine 0.10.7 pickles ``HistoryBuffer`` objects, numpy arrays, scalars and
dtypes into every checkpoint, which ``torch.load``'s default
``weights_only=True`` refuses. :func:`encode_checkpoint` rewrites them into
tagged plain data before the file is written and :func:`decode_checkpoint`
rewrites them back; decoding is a closed set of known types, so it never
imports or calls anything the file names. The encoded form (version 1) and
why each type is there: ``docs/checkpoints.md``.
"""
from __future__ import annotations

import collections
from typing import Any

import numpy as np
import torch
from mmengine.config import ConfigDict
from mmengine.logging import HistoryBuffer

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
        'torch.load(weights_only=True) refuses and cbn_plugin.engine has no encoding '
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
        # The public constructor (it copies the arrays, keeping their dtype).
        return HistoryBuffer(_decode(enc['log_history']), _decode(enc['count_history']),
                             max_length=enc['max_length'])
    if tag == 'ConfigDict':
        return ConfigDict(_decode(enc['items']))
    raise ValueError(f'checkpoint holds an object encoded as {tag!r}, which this version of '
                     f'cbn_plugin.engine (format {FORMAT}) does not know')


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
    """Encode a Runner checkpoint in place (and return it); see docs/checkpoints.md."""
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

