"""What the CUDA kernels require of the calls the layer issues, checked on this CPU machine.

No GPU has run the plugin; the CPU kernels accept calls that the CUDA ones refuse
(``batch_norm_backward_cuda`` asserts defined saved statistics where the CPU
kernel does without). Two dispatch modes see every aten call of a training step:

* ``KernelContracts`` checks each call against the rules of its CUDA kernel
  (``aten/src/ATen/native/cuda/Normalization.cu``, ``Convolution``, ``Blas``):
  ``contract_violations`` says which rule a call breaks;
* ``DeviceChecker`` runs a step on the ``meta`` device (no data, any op: a
  stand-in for a GPU whose tensors the CPU cannot read) and records every tensor
  made on the host, every host-to-device copy and every call that mixes devices,
  each of which on a GPU is a crash or a copy that waits for the device.
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

HALF = (torch.float16, torch.bfloat16)
_BN_BACKWARD = 'aten.native_batch_norm_backward.default'
# Forward BN kernels: (input, weight, bias, running_mean, running_var, ...).
_BN_FORWARD = ('aten.native_batch_norm.default', 'aten._native_batch_norm_legit.default',
               'aten._native_batch_norm_legit.no_stats',
               'aten._native_batch_norm_legit_no_training.default',
               'aten._batch_norm_with_update.default', 'aten._batch_norm_no_update.default',
               'aten.cudnn_batch_norm.default')
# Kernels whose floating tensor arguments must share one dtype on CUDA (cuBLAS, cuDNN).
_SAME_DTYPE = ('aten.mm.', 'aten.bmm.', 'aten.addmm', 'aten.baddbmm', 'aten.addmv', 'aten.mv.',
               'aten.dot.', 'aten.addbmm', 'aten.convolution.', 'aten.convolution_backward.')


def _bn_params(name: str, input_: torch.Tensor, params, what: str) -> list[str]:
    """BN's CUDA kernels: parameters in the input's dtype, or, for a float16/bfloat16
    input, all float32 (``is_mixed_type``: the first defined parameter decides)."""
    defined = [p for p in params if isinstance(p, torch.Tensor)]
    dtypes = {p.dtype for p in defined}
    if not dtypes or dtypes == {input_.dtype}:
        return []
    if input_.dtype in HALF and dtypes == {torch.float32}:
        return []
    return [f'{name}: {what} of dtypes {sorted(map(str, dtypes))} with a {input_.dtype} input '
            '(CUDA takes them in the input dtype, or all float32 for a float16/bfloat16 input)']


def contract_violations(func, args, kwargs) -> list[str]:
    """The rules of ``func``'s CUDA kernel that this call breaks (empty: none)."""
    name = str(func)
    if name == _BN_BACKWARD:
        grad, input_, weight, _, _, save_mean, save_invstd, _, _, mask = args[:10]
        found = []
        # batch_norm_backward_cuda: only the fused path (input gradient asked for, and
        # contiguous 32-bit-indexable tensors) does without; everything else asserts.
        if save_mean is None or save_invstd is None:
            found.append(f'{name} without saved statistics (save_mean {save_mean is not None}, '
                         f'save_invstd {save_invstd is not None}): batch_norm_backward_cuda '
                         'asserts "save_mean should always be defined"')
        if (mask[1] or mask[2]) and weight is None:
            found.append(f'{name} asks for weight/bias gradients with no weight: the CUDA '
                         "reduction allocates them with the weight's options (no device)")
        if grad.dtype != input_.dtype:
            found.append(f'{name}: grad_out {grad.dtype} and input {input_.dtype} differ '
                         '(one kernel template reads both)')
        return found + _bn_params(name, input_, (weight, save_mean, save_invstd),
                                  'weight/save_mean/save_invstd')
    if name in _BN_FORWARD:
        return _bn_params(name, args[0], args[1:5], 'weight/bias/running statistics')
    if name.startswith(_SAME_DTYPE):
        tensors = [a for a in tree_flatten((args, kwargs))[0]
                   if isinstance(a, torch.Tensor) and a.is_floating_point()]
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            return [f'{name} with mixed dtypes {sorted(map(str, dtypes))} (cuBLAS/cuDNN take '
                    'one)']
    return []


def cpu_trains_in(dtype: torch.dtype) -> bool:
    """Whether this torch's CPU kernels train a conv + BN under ``dtype`` autocast with
    a ``dtype`` BN input (torch 2.1's CPU autocast takes bfloat16 only, and its CPU
    BN backward has no float16 kernel; a GPU has both)."""
    import warnings
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with torch.autocast('cpu', dtype=dtype):
                y = torch.nn.functional.conv2d(x, torch.randn(3, 3, 1, 1))
                out = torch.nn.functional.batch_norm(y, None, None, torch.ones(3),
                                                     torch.zeros(3), True)
        out.float().sum().backward()
    except RuntimeError:
        return False
    return y.dtype == dtype


class KernelContracts(TorchDispatchMode):
    """Records every aten call (``calls``, by name) and each CUDA-contract violation
    (``violations``: message and where it was issued)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.violations: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        for message in contract_violations(func, args, kwargs):
            self.violations.append((message, ''.join(traceback.format_stack(limit=10)[:-1])))
        return func(*args, **kwargs)


class DeviceChecker(TorchDispatchMode):
    """Runs the calls and records (``found``: what, the op, where) every tensor made on
    the host, every copy from the host to another device, and every call that mixes
    devices, with the model and its inputs on ``meta``. An op without a meta kernel
    runs on zeros on the CPU, its outputs put back on ``meta`` (``fallback``)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []
        self.fallback: set[str] = set()

    def _note(self, what: str, func) -> None:
        self.found.append((what, str(func), ''.join(traceback.format_stack(limit=10)[:-2])))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        name = str(func)
        target = kwargs.get('device')
        if name == 'aten.lift_fresh.default':  # torch.tensor / new_tensor / a list index
            self._note('a tensor from host data', func)
        elif name == 'aten._to_copy.default' and tensors[0].device.type == 'cpu' \
                and target is not None and torch.device(target).type != 'cpu':
            self._note('a host-to-device copy', func)
        elif len(devices) > 1:
            self._note(f'devices mixed ({sorted(devices)})', func)
        try:
            out = func(*args, **kwargs)
        except NotImplementedError:  # no meta kernel: the CPU one on zeros
            def on_cpu(a):
                return (torch.zeros(a.shape, dtype=a.dtype)
                        if isinstance(a, torch.Tensor) and a.device.type == 'meta' else a)
            out = func(*tree_map(on_cpu, args), **tree_map(on_cpu, kwargs))
            self.fallback.add(name)
            return tree_map(lambda o: o.to('meta') if isinstance(o, torch.Tensor) else o, out)
        if any(isinstance(o, torch.Tensor) and o.device.type == 'cpu'
               for o in tree_flatten(out)[0]):
            self._note('a tensor made on the host', func)
        return out

    def report(self) -> str:
        seen, lines = set(), []
        for what, op, where in self.found:
            if (what, op) not in seen:
                seen.add((what, op))
                lines.append(f'{what}: {op}\n{where}')
        return '\n'.join(lines)
