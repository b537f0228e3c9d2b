"""The maths of Cross-Iteration Batch Normalization as pure torch functions.

No mmcv/mmdet import here: everything takes and returns tensors, so it can be
tested against brute-force references and reused by any framework.

Notation (``docs/algorithm.md``): a conv with weight ``W``
(``C x P'`` once flattened, ``P' = Cin/groups * kh * kw``) and optional bias
``b`` produces ``x``; per channel the statistics are the mean ``mu`` and the
*biased* variance ``var`` over the ``m = N*H*W`` positions.

Why the window keeps ``(mu, var)`` and not ``(mu, nu = E[x^2])``: in float32
``E[x^2] - mu^2`` cancels catastrophically when ``|mu| >> sigma``. Every
quantity below is kept centred instead, using two exact identities of a conv
followed directly by the norm (``p`` the input patches, ``x = W p + b``):

* ``dmu/dW_j`` is the mean input patch ``p_bar`` (shared by all channels of a
  group) and ``<p_bar, W_j> + b_j = mu_j``;
* ``dvar/dW_j = (2/m) sum_i (x_ij - mu_j) p_i`` (a conv weight-gradient with
  ``grad_output = 2 (x - mu) / m``) and ``<dvar/dW_j, W_j> = 2 var_j``.

So a past slot needs no copy of its old weights: with the current weights
``W_t``, ``d_mu = <p_bar, W_t> + b_t - mu_old`` and
``<dvar/dW, W_t - W_old> = <dvar/dW, W_t> - 2 var_old``. The first-order Taylor
step on ``(mu, nu)`` that the paper describes is then, exactly,
``mu_c = mu_old + rho d_mu`` and
``var_c = var_old + rho <dvar/dW, dW> - rho^2 d_mu^2``. The ``'var'``
compensation takes the first-order step on the variance itself,
``var_c = var_old + rho <dvar/dW, dW>``: the (mu, nu) form under-estimates
every past variance by ``d_mu^2 + dW^T C dW``, the var form by ``dW^T C dW``
only.

Both are explicit functions of the current conv weight (and bias), so the
past entries can carry gradient to it (``pool_compensated``): the exact
gradient of the function the layer evaluates, where the paper treats them as
constants.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import compat
from .options import COMPENSATIONS, VARIANCE_RULES  # noqa: F401  (re-exported)


class SlotStats(NamedTuple):
    """What one step contributes to the window, for one layer.

    ``count``: the positions behind the statistics (an int, or a 0-dim tensor
    where it comes from the device: SyncCBN's all-reduce). ``grad_mean``
    (``groups x P'``) and ``grad_var`` (``C x P'``) are ``None`` when the
    layer does not compensate (``rho == 0``).
    """
    count: int | Tensor
    mean: Tensor
    var: Tensor
    grad_mean: Tensor | None
    grad_var: Tensor | None


def stats_dtype(x: Tensor) -> torch.dtype:
    """Statistics are float32 (float64 for float64 inputs), also under autocast."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: itself when it already is. A ``.to`` that changes nothing
    still costs a few microseconds of argument parsing, several times per layer step."""
    return t if t.dtype == dtype else t.to(dtype)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of an ``N x C x H x W`` tensor.

    BN's own statistics kernel (mean first, then centred squares: no
    ``E[x^2] - mu^2`` cancellation); on CPU it is about 4x faster than
    ``torch.var_mean`` over three dimensions.
    """
    return torch.batch_norm_update_stats(as_dtype(x, stats_dtype(x)), None, None, 0.0)


def _conv_geometry(conv_input: Tensor, conv: torch.nn.Conv2d) -> tuple[Tensor, tuple]:
    """The (padded) input and padding that reproduce ``conv``'s forward."""
    if isinstance(conv.padding, str) or conv.padding_mode != 'zeros':
        mode = 'constant' if conv.padding_mode == 'zeros' else conv.padding_mode
        return F.pad(conv_input, conv._reversed_padding_repeated_twice, mode=mode), (0, 0)
    return conv_input, conv.padding


def _patch_sum(inp: Tensor, padding, conv: torch.nn.Conv2d, out_hw,
               dtype: torch.dtype | None = None) -> Tensor:
    """Sum of the input patches over all output positions, per group: ``groups x P'``,
    accumulated and returned in ``dtype`` (``inp``'s when not given: a float16 input's
    sums are float32, not rounded to float16 on the way).

    The same for every output channel, and linear in the input: sum the batch
    first, then each kernel offset sees a strided window of the padded sum.
    (A weight-gradient convolution with one output channel costs as much as a
    full one on CPU.)
    """
    kh, kw = conv.weight.shape[2:]
    dtype = inp.dtype if dtype is None else dtype
    if (kh, kw) == (1, 1) and tuple(conv.stride) == (1, 1) and tuple(padding) == (0, 0):
        return inp.sum(dim=(0, 2, 3), dtype=dtype).view(conv.groups, -1)  # a 1x1 patch: a pixel
    total = inp.sum(0, dtype=dtype)
    ph, pw = padding
    total = F.pad(total, (pw, pw, ph, ph))
    (sh, sw), (dh, dw), (ho, wo) = conv.stride, conv.dilation, out_hw
    sums = [total[:, i * dh:i * dh + sh * (ho - 1) + 1:sh,
                  j * dw:j * dw + sw * (wo - 1) + 1:sw].sum(dim=(1, 2))
            for i in range(kh) for j in range(kw)]
    return torch.stack(sums, dim=1).reshape(conv.groups, -1)


def _weight_grad(inp: Tensor, grad_out: Tensor, conv: torch.nn.Conv2d, stride, padding) -> Tensor:
    """``sum_i grad_out_i p_i``: one weight-gradient convolution, ``C x P'`` (contiguous).

    The conv's own weight stands in for its shape (only the weight gradient is
    asked for); any memory format in, a contiguous row per channel out.
    """
    weight = conv.weight
    if weight.dtype != inp.dtype:
        weight = weight.to(inp.dtype)
    grad = torch.ops.aten.convolution_backward(
        grad_out, inp, weight, None, stride, padding, conv.dilation, False, [0, 0],
        conv.groups, (False, True, False))[1]
    return grad.contiguous().view(grad.shape[0], -1)


def _centre_patches_(grad: Tensor, residual: Tensor, patch_mean: Tensor,
                     alpha: float = 1.0) -> Tensor:
    """``alpha (grad - residual (x) patch_mean)`` per group, in place: ``C x P'``.

    In place because ``|W|``-sized temporaries are what makes the derivative
    bookkeeping slow on CPU: each fresh one is new pages to fault in, several
    times the cost of the arithmetic at FPN shapes.
    """
    groups = patch_mean.shape[0]
    c = grad.shape[0]
    if groups == 1:
        return grad.addmm_(residual.view(c, 1), patch_mean, beta=alpha, alpha=-alpha)
    grad.view(groups, c // groups, -1).baddbmm_(
        residual.view(groups, -1, 1), patch_mean.unsqueeze(1), beta=alpha, alpha=-alpha)
    return grad


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a_c, b_c>`` per row: ``C x P'`` and ``C x P'`` give ``C``.

    Product then sum: on CPU about 5x faster than ``einsum`` or ``bmm``,
    which treat each row as its own tiny matrix product.
    """
    return (a * b).sum(-1)


def _slot_dot(grad_var: Tensor, weight: Tensor) -> Tensor:
    """``<grad_var[k, c], W_c>`` for every slot ``k`` and channel ``c``: ``K x C``.

    One batched row-vector product over the channels, ``W_c (1 x P')`` times
    the ``P' x K`` matrix of channel ``c``'s slots, read in place from the
    ``K x C x P'`` window. A product and a sum would write a ``K x C x P'``
    temporary and read it back: at a long window that is most of a step
    (measured 10x slower at ``K = 31``, ``C = 256``, ``P' = 2304``; 1.4x
    slower even at ``K = 3``, ``C = 64``).
    """
    k, c, _ = grad_var.shape
    return torch.bmm(weight.unsqueeze(1), grad_var.permute(1, 2, 0)).view(c, k).t()


# Below this many numbers a ``K x C x P'`` temporary stays in the caches and
# a product and a sum beat a batched product of short rows (few slots).
_TEMPORARY_NUMEL = 1 << 21


def _slot_combination(grad_var: Tensor, coef: Tensor) -> Tensor:
    """``sum_k coef[k, c] grad_var[k, c]``: ``C x P'`` (the transpose of ``_slot_dot``).

    Large windows: one batched ``1 x K`` by ``K x P'`` product per channel,
    read in place (no temporary of the window's size); small ones: a product
    and a sum, faster while the temporary fits the caches.
    """
    k, c, p = grad_var.shape
    if grad_var.numel() < _TEMPORARY_NUMEL:
        return (grad_var * coef.unsqueeze(-1)).sum(0)
    return torch.bmm(coef.t().unsqueeze(1), grad_var.transpose(0, 1)).view(c, p)


def conv_stat_grads(conv_input: Tensor, conv_output: Tensor, mean: Tensor, var: Tensor,
                    conv: torch.nn.Conv2d, stride: int = 1) -> tuple[Tensor, Tensor]:
    """Derivatives of the batch mean and variance of ``conv_output`` w.r.t. the conv weight.

    Returns ``(grad_mean, grad_var)``: the mean input patch per group
    (``groups x P'``) and ``dvar/dW`` (``C x P'``). One weight-gradient
    convolution with ``C`` output channels plus a sum of the batch-summed
    input; no autograd graph. Any memory format.

    ``stride > 1`` estimates ``dvar/dW`` from one output position in
    ``stride^2`` (that many times cheaper; the statistics and the mean patch
    stay exact) and then corrects it along ``W`` so that
    ``<grad_var, W> = 2 var`` still holds exactly. The positions are every
    ``stride``-th row and column of each map, or, when the batch holds more
    samples than a map has positions (RoI features: hundreds of 7x7 maps,
    where strided rows would keep 16 of 49 positions, not 12), every
    ``stride^2``-th sample.

    Under float16/bfloat16 autocast (``conv_output`` in that dtype) the
    weight-gradient convolution runs in it, as the conv's own backward does
    (float32 would double its input's memory traffic and leave the tensor
    cores), and accumulates in float32; the statistics, the mean patch and
    the result are float32. Its rounding (about 1e-3 relative in float16)
    would break ``<grad_var, W> = 2 var``, on which every compensation rests
    (``<grad_var, W_t> - 2 var_old`` must vanish when the weight has not
    moved): so, as for ``stride > 1``, the result is corrected along ``W``
    (the float32 weight the compensation reads) until it holds to float32
    rounding.
    """
    dtype = mean.dtype
    low = conv_output.dtype in (torch.float16, torch.bfloat16)
    conv_dtype = conv_output.dtype if low else dtype
    inp, padding = _conv_geometry(as_dtype(conv_input, conv_dtype), conv)  # (under no_grad)
    out = as_dtype(conv_output, conv_dtype)
    n, c, h, w = out.shape
    grad_mean = _patch_sum(inp, padding, conv, (h, w), dtype).div_(n * h * w)
    conv_stride = tuple(conv.stride)
    if stride > 1 and n > h * w:
        out, inp = out[::stride * stride], inp[::stride * stride]
    elif stride > 1:
        # Output positions (i s, j s) are those of the same conv with s times the stride.
        out = out[:, :, ::stride, ::stride]
        conv_stride = tuple(s * stride for s in conv.stride)
    sampled = out.shape[0] * out.shape[2] * out.shape[3]
    centred = out - as_dtype(mean, conv_dtype).view(1, c, 1, 1)
    grad_var = as_dtype(_weight_grad(inp, centred, conv, conv_stride, tuple(padding)), dtype)
    # sum_i (x_i - mu) is 0 in exact arithmetic but not in float32, and times
    # large input patches it would break <grad_var, W> = 2 var. Subtracting it
    # along the mean patch computes sum_i (x_i - mu) (p_i - p_bar) instead
    # (whatever the rounding of mu was); the same pass scales by 2/m.
    grad_var = _centre_patches_(grad_var, centred.sum(dim=(0, 2, 3), dtype=dtype), grad_mean,
                                2.0 / sampled)
    if stride > 1 or low:
        weight = conv.weight.detach().to(dtype).flatten(1)
        gap = 2.0 * var - _row_dot(grad_var, weight)
        grad_var.addcmul_((gap / _row_dot(weight, weight).clamp_min(1e-30)).unsqueeze(1), weight)
    return grad_mean, grad_var


def shifted_sums(x: Tensor, shift: Tensor, conv_input: Tensor | None,
                 conv: torch.nn.Conv2d | None) -> Tensor:
    """One flat vector of sums that add up exactly across devices (for SyncCBN).

    ``[n, sum(x - s), sum((x - s)^2), sum_i p_i, sum_i (x_i - s) p_i]`` per
    channel, the last two only with a conv. ``s`` must be the same on every
    device; close to the mean it keeps the float32 sums free of cancellation.
    """
    dtype = stats_dtype(x)
    out = as_dtype(x.detach(), dtype)
    n, c, h, w = out.shape
    centred = out - as_dtype(shift, dtype).view(1, c, 1, 1)
    # The count as a fill on the device (its value a kernel argument): ``new_tensor``
    # would copy it from the host, a blocking copy per layer and forward.
    parts = [out.new_full((1,), float(n * h * w)), centred.sum(dim=(0, 2, 3)),
             (centred * centred).sum(dim=(0, 2, 3))]
    if conv is not None:
        inp, padding = _conv_geometry(as_dtype(conv_input.detach(), dtype), conv)
        parts.append(_patch_sum(inp, padding, conv, (h, w)).flatten())
        parts.append(_weight_grad(inp, centred, conv, tuple(conv.stride), tuple(padding)).flatten())
    return torch.cat(parts)


def stats_from_sums(sums: Tensor, shift: Tensor, groups: int = 1) -> SlotStats:
    """The statistics and derivatives of the positions behind ``shifted_sums``.

    With ``mu = s + S1/n``: ``sum_i (x_i - mu)(p_i - p_bar) = A - (mu - s) b``
    because ``sum_i (x_i - mu) = 0``; so the derivatives reduce exactly.
    """
    c = shift.shape[0]
    count = sums[0]  # a tensor: reading it would wait for the device
    s1, s2 = sums[1:1 + c] / count, sums[1 + c:1 + 2 * c] / count
    mean = as_dtype(shift, sums.dtype) + s1
    var = (s2 - s1 * s1).clamp_min(0)
    rest = sums[1 + 2 * c:]
    if rest.numel() == 0:
        return SlotStats(count, mean, var, None, None)
    # rest = [b (groups x P'), A (C x P')]
    p = rest.numel() // (groups + c)
    patch_sum = rest[:groups * p].view(groups, p)
    grad_mean = patch_sum / count
    weighted = rest[groups * p:].view(c, p)
    scale = 2.0 / count  # (a copy of ``weighted`` either way)
    grad_var = _centre_patches_(weighted * scale, s1 * scale, patch_sum)
    return SlotStats(count, mean, var, grad_mean, grad_var)


def all_finite(stats: SlotStats) -> Tensor:
    """Whether every statistic and derivative of a record is finite: a 0-dim bool tensor.

    Stays on the device (no host read). A norm is NaN or infinite as soon as
    one entry is: one fused norm per tensor, then one check. (A norm can also
    overflow: such a record is dropped, as it should be.)
    """
    norms = torch._foreach_norm([t for t in stats[1:] if t is not None], 1)
    return is_finite(torch.stack(norms).sum())


def all_finite_each(records: list[SlotStats]) -> list[Tensor]:
    """``all_finite`` of each record, in a fixed number of ops for all of them (one fused
    norm over every tensor; then, when the records have the same fields, one sum)."""
    fields = [[t for t in r[1:] if t is not None] for r in records]
    if not fields:
        return []
    norms = torch._foreach_norm([t for f in fields for t in f], 1)
    if len({len(f) for f in fields}) == 1 and len({n.device for n in norms}) == 1:
        return list(is_finite(torch.stack(norms).view(len(fields), -1).sum(1)).unbind(0))
    ends = [0]
    for f in fields:
        ends.append(ends[-1] + len(f))
    return [is_finite(torch.stack(norms[a:b]).sum()) for a, b in zip(ends, ends[1:])]


def is_finite(t: Tensor) -> Tensor:
    """``isfinite(t)`` in two ops (``t - t`` is 0 exactly where ``t`` is finite), not four."""
    return (t - t) == 0


def select_stats(condition: Tensor, a: SlotStats, b: SlotStats) -> SlotStats:
    """Field by field ``a`` where ``condition`` (0-dim bool) holds, else ``b``; no host read."""
    def pick(x, y):
        return None if x is None or y is None else torch.where(condition, x, y)
    count = torch.where(condition, a.count, b.count).to(a.mean.dtype)
    return SlotStats(count, pick(a.mean, b.mean),
                     pick(a.var, b.var), pick(a.grad_mean, b.grad_mean),
                     pick(a.grad_var, b.grad_var))


def zero_stats(stats: SlotStats) -> SlotStats:
    """A record of the same count and shapes, all zeros (stands in for a non-finite one)."""
    return SlotStats(stats.count, *(None if t is None else torch.zeros_like(t)
                                    for t in stats[1:]))


def merge_stats(a: SlotStats, b: SlotStats) -> SlotStats:
    """Statistics of the union of two sets of positions taken with the same weights.

    Exact (Chan et al.'s parallel variance); the variance derivative picks up
    the spread of the means, so ``<grad_var, W> = 2 var`` still holds.
    """
    total = a.count + b.count
    wa, wb = a.count / total, b.count / total
    mean = wa * a.mean + wb * b.mean
    da, db = a.mean - mean, b.mean - mean
    var = wa * (a.var + da * da) + wb * (b.var + db * db)
    if a.grad_mean is None or b.grad_mean is None:
        return SlotStats(total, mean, var, None, None)
    grad_mean = wa * a.grad_mean + wb * b.grad_mean
    groups = a.grad_mean.shape[0]

    def spread(weight: float, dmean: Tensor, patch: Tensor) -> Tensor:
        per_group = dmean.view(groups, -1, 1) * patch.unsqueeze(1)
        return (2.0 * weight) * per_group.reshape(dmean.shape[0], -1)

    grad_var = (wa * a.grad_var + wb * b.grad_var
                + spread(wa, da, a.grad_mean) + spread(wb, db, b.grad_mean))
    return SlotStats(total, mean, var, grad_mean, grad_var)


def merge_calls(current: SlotStats, before: SlotStats, before_finite: Tensor | None,
                before_skips: Tensor | None):
    """This call's statistics merged with the same step's earlier calls.

    Returns ``(statistics to pool, the step's record, whether the record is
    finite, this call's share of the pooled positions, the earlier calls for
    the compensated backward or None, the calls left out so far)``. The
    weights do not change within a step, so the merge is exact. On the
    device: earlier calls whose statistics are not finite are not pooled, and
    a call whose statistics are not finite is left out of the record.
    """
    before_finite = all_finite(before) if before_finite is None else before_finite
    finite = all_finite(current)
    # Zeros for a non-finite side: nothing non-finite reaches the merge's arithmetic.
    before = select_stats(before_finite, before, zero_stats(before))
    to_pool = select_stats(before_finite, merge_stats(before, current), current)
    record = select_stats(finite, to_pool, before)
    share = current.count / to_pool.count
    earlier = None
    if before.grad_mean is not None:
        earlier = EarlierCalls(before.mean, before.grad_mean, before.grad_var, to_pool.mean,
                               share)
    skips = (before_skips if before_skips is not None else (~before_finite).long()) \
        + (~finite).long()
    return to_pool, record, finite | before_finite, share, earlier, skips


def window_shift(entries: WindowEntries, pooled: PooledStats, eps: float):
    """``(mean_shift, negative_fraction)`` over the slots in use (0-dim tensors): how far
    the compensation moved the stored means (in stored standard deviations), and how
    many compensated variances came out negative."""
    with torch.no_grad():
        use = entries.use.expand_as(pooled.past_mean)
        n = use.sum().clamp_min(1)
        shift = ((pooled.past_mean - entries.mean).abs()
                 / (entries.var + eps).sqrt()).nan_to_num(0.0, 0.0, 0.0)
        return (shift * use).sum() / n, ((pooled.past_var < 0) & use).sum() / n


def running_target(step_mean: Tensor, step_var: Tensor, count, pooled: PooledStats,
                   source: str) -> tuple[Tensor, Tensor]:
    """What the running statistics average: the step's batch statistics (``'batch'``,
    as BN) or the pooled window's (``'window'``), the variance unbiased by the
    positions behind it. ``count``: an int, or SyncCBN's global count as a tensor."""
    if source == 'batch':
        unbias = count / (count - 1) if isinstance(count, Tensor) or count > 1 else 1.0
        return step_mean, step_var * unbias
    total = pooled.count * count
    return pooled.mean, pooled.var * total / (total - 1).clamp_min_(1)


def running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                   factor: float | Tensor) -> None:
    """BN's running average ``running += factor (new - running)``, in place; a channel
    whose update is not finite keeps its value (its step is zeroed). No host read.
    ``factor``: a number, or a 0-dim tensor on the device (a cumulative average)."""
    buffers = [running_mean, running_var]
    steps = torch._foreach_sub([as_dtype(mean, running_mean.dtype),
                                as_dtype(var, running_var.dtype)],
                               buffers)
    steps = [s.nan_to_num_(0.0, 0.0, 0.0) for s in steps]
    if isinstance(factor, Tensor):
        torch._foreach_mul_(steps, factor)
        torch._foreach_add_(buffers, steps)
    else:
        torch._foreach_add_(buffers, steps, alpha=factor)


class RunningUpdate(NamedTuple):
    """A layer's running-statistics update, left for the end of its step (``running_updates``).

    ``mean``/``var``: the step's batch statistics (``pooled_count`` None: BN's
    target) or the pooled window's (``pooled_count``: entries pooled per
    channel); ``count``: positions behind the step's statistics (an int, or
    SyncCBN's global count as a tensor); ``momentum``: the layer's (``None``: a
    cumulative average over ``num_batches_tracked``); ``calls``: the batches it
    counts.
    """
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    mean: Tensor
    var: Tensor
    pooled_count: Tensor | None
    count: int | Tensor
    momentum: float | None
    calls: int


def running_updates(updates: list[RunningUpdate]) -> None:
    """``running_target`` and ``running_update`` for many layers at once, in place.

    The same arithmetic, in a fixed number of foreach ops whatever the number of
    layers (one or two of each per layer would be most of what a layer step
    dispatches after its kernels). Each buffer appears at most once in ``updates``
    (a layer's later updates: a later call; the caller orders them). No host read.
    """
    if not updates:
        return
    torch._foreach_add_([u.num_batches_tracked for u in updates], [u.calls for u in updates])
    targets: list = [None] * len(updates)
    host = [i for i, u in enumerate(updates) if not isinstance(u.count, Tensor)]
    window = [i for i in host if updates[i].pooled_count is not None]
    if window:  # var * total / max(total - 1, 1): unbiased by the positions behind it
        totals = torch._foreach_mul([updates[i].pooled_count for i in window],
                                    [updates[i].count for i in window])
        denominators = torch._foreach_sub(totals, 1)
        torch._foreach_clamp_min_(denominators, 1)
        variances = torch._foreach_mul([updates[i].var for i in window], totals)
        torch._foreach_div_(variances, denominators)
        for i, var in zip(window, variances):
            targets[i] = (updates[i].mean, var)
    batch = [i for i in host if updates[i].pooled_count is None]
    if batch:
        variances = torch._foreach_mul(
            [updates[i].var for i in batch],
            [c / (c - 1) if c > 1 else 1.0 for c in (updates[i].count for i in batch)])
        for i, var in zip(batch, variances):
            targets[i] = (updates[i].mean, var)
    for i, u in enumerate(updates):  # a count on the device (SyncCBN): one layer at a time
        if targets[i] is None:
            alone = PooledStats(u.mean, u.var, u.pooled_count, None, None, None)
            targets[i] = running_target(u.mean, u.var, u.count, alone,
                                        'batch' if u.pooled_count is None else 'window')
    buffers = [b for u in updates for b in (u.running_mean, u.running_var)]
    steps = torch._foreach_sub([as_dtype(t, b.dtype) for pair, u in zip(targets, updates)
                                for t, b in zip(pair, (u.running_mean, u.running_var))],
                               buffers)
    # A channel whose update is not finite keeps its value: one op for all the layers.
    if len({(s.device, s.dtype) for s in steps}) == 1:
        flat = torch.cat(steps).nan_to_num_(0.0, 0.0, 0.0)
        steps = flat.split([s.numel() for s in steps])
    else:
        steps = [s.nan_to_num_(0.0, 0.0, 0.0) for s in steps]
    fixed: dict[float, list[int]] = {}
    cumulative = []
    for i, u in enumerate(updates):
        (cumulative if u.momentum is None else fixed.setdefault(u.momentum, [])).append(i)
    for momentum, rows in fixed.items():
        torch._foreach_add_([buffers[j] for i in rows for j in (2 * i, 2 * i + 1)],
                            [steps[j] for i in rows for j in (2 * i, 2 * i + 1)], alpha=momentum)
    if cumulative:  # 1 / num_batches_tracked, on the device
        factors = [updates[i].num_batches_tracked.to(updates[i].running_mean.dtype)
                   .reciprocal_() for i in cumulative]
        scaled = torch._foreach_mul([steps[j] for i in cumulative for j in (2 * i, 2 * i + 1)],
                                    [f for f in factors for _ in range(2)])
        torch._foreach_add_([buffers[j] for i in cumulative for j in (2 * i, 2 * i + 1)],
                            scaled)


def compensate(mean_old: Tensor, var_old: Tensor, grad_mean: Tensor | None,
               grad_var: Tensor | None, weight: Tensor | None, bias: Tensor | None,
               rho: float, compensation: str = 'mu_nu') -> tuple[Tensor, Tensor]:
    """Move old statistics (``J x C``) to the current conv weights.

    ``grad_mean``: ``J x groups x P'``; ``grad_var``: ``J x C x P'``;
    ``weight``: the current conv weight, ``bias`` its bias or ``None``.
    ``compensation``: ``'mu_nu'`` (the paper's first-order step on the mean
    and the second moment) or ``'var'`` (on the mean and the variance).
    Returns the compensated ``(mean, var)``, detached; ``var`` may be
    negative (a first-order step under-estimates it), the variance rule
    decides.
    """
    if compensation not in COMPENSATIONS:
        raise ValueError(f'compensation {compensation!r} is not one of {COMPENSATIONS}')
    if rho == 0 or grad_mean is None:
        return mean_old, var_old
    with torch.no_grad():
        mean, var, _ = _compensated(mean_old, var_old, grad_mean, grad_var, weight,
                                    bias, rho, compensation)
    return mean, var


def _compensated(mean_old: Tensor, var_old: Tensor, grad_mean: Tensor, grad_var: Tensor,
                 weight: Tensor, bias: Tensor | None, rho: float, compensation: str
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``compensate``'s maths for ``rho != 0``, with few ops: ``(mean, var, d_mean)``,
    ``d_mean = <p_bar, W> + b - mean_old`` under ``'mu_nu'`` (its backward needs it),
    else ``None``. Called without autograd (``compensate``, ``_CompensatedPool``)."""
    dtype = mean_old.dtype
    w = as_dtype(weight, dtype).flatten(1)
    proj_mean = _patch_dot(grad_mean, w)
    if bias is not None:
        proj_mean.add_(as_dtype(bias, dtype))
    proj_var = _slot_dot(grad_var, w)
    mean = proj_mean if rho == 1.0 else torch.lerp(mean_old, proj_mean, rho)
    # <dvar/dW, W_old> = 2 var_old: the step along W_t - W_old needs no old weight.
    var = (proj_var.sub_(var_old) if rho == 1.0
           else torch.add(var_old, proj_var, alpha=rho).sub_(var_old, alpha=2.0 * rho))
    d_mean = None
    if compensation == 'mu_nu':
        d_mean = proj_mean - mean_old
        var.addcmul_(d_mean, d_mean, value=-rho * rho)
    return mean, var, d_mean


def apply_variance_rule(mean: Tensor, var: Tensor, rule: str) -> tuple[Tensor, Tensor, Tensor]:
    """Apply the negative-variance rule to compensated past entries.

    ``'clamp'``: ``max(nu, mu^2)``, i.e. ``var := max(var, 0)``.
    ``'exclude'``: drop the (step, channel) entry, as the authors' code does.
    Non-finite entries are always dropped. Returns ``(var, valid, negative)``.
    """
    if rule not in VARIANCE_RULES:
        raise ValueError(f'variance rule {rule!r} is not one of {VARIANCE_RULES}')
    finite = torch.isfinite(mean) & torch.isfinite(var)
    negative = finite & (var < 0)
    if rule == 'clamp':
        return var.clamp_min(0), finite, negative
    return var, finite & ~negative, negative


def pool_window(mean_cur: Tensor, var_cur: Tensor, mean_past: Tensor, var_past: Tensor,
                valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Average the current entry with the valid past entries, per channel.

    ``mean_past``/``var_past``/``valid`` are ``J x C``. The current entry is
    never dropped, so the per-channel count is at least 1. The pooled variance
    is ``mean(var_e) + mean((mu_e - mu_bar)^2)``: the same number as
    ``mean(nu_e) - mu_bar^2`` without its cancellation. Returns
    ``(mean, var, count)``; ``pooled_batch_norm`` takes the gradient through
    the current entry analytically, with weight ``1 / count``; past entries
    that carry gradient (``pool_compensated``) get theirs through autograd.
    """
    count = valid.sum(0).to(mean_cur.dtype) + 1
    zero = mean_cur.new_zeros(())
    # Dropped entries may be non-finite: zero them before any arithmetic, so
    # that no NaN reaches the gradient of the others through torch.where.
    mean_past = torch.where(valid, mean_past, zero)
    var_past = torch.where(valid, var_past, zero)
    mean = (mean_cur + mean_past.sum(0)) / count
    spread_past = torch.where(valid, var_past + (mean_past - mean) ** 2, zero).sum(0)
    var = (var_cur + (mean_cur - mean) ** 2 + spread_past) / count
    return mean, var, count


class WindowEntries(NamedTuple):
    """The ring of past steps at one call position, as stored: ``K`` slots in ring order.

    ``mean``/``var``: ``K x C``; ``grad_mean``: ``K x groups x P'`` and
    ``grad_var``: ``K x C x P'`` (``None`` without compensation); ``use``:
    ``K x 1`` bool, the slot holds a finite step inside the active window.
    Order does not matter to the pool: a sum over the used slots.
    """
    mean: Tensor
    var: Tensor
    grad_mean: Tensor | None
    grad_var: Tensor | None
    use: Tensor


class PooledStats(NamedTuple):
    """What ``pool_compensated`` returns: the pooled ``mean``/``var`` (``C``), ``count``
    (``C``: entries pooled, the step's counting 1), and per slot (``K x C``) the
    compensated ``past_mean``/``past_var`` (before the variance rule) and ``pooled``,
    which entries the pool took."""
    mean: Tensor
    var: Tensor
    count: Tensor
    past_mean: Tensor
    past_var: Tensor
    pooled: Tensor


def _patch_dot(grad_mean: Tensor, weight: Tensor) -> Tensor:
    """``<p_bar_k, W_c>`` for every slot ``k`` and channel ``c``: ``K x C``.

    ``grad_mean``: ``K x groups x P'``; ``weight``: ``C x P'``. One matrix
    product (one batched product per group for grouped convs).
    """
    k, groups, p = grad_mean.shape
    if groups == 1:
        return torch.mm(grad_mean.view(k, p), weight.t())
    c = weight.shape[0]
    return torch.bmm(grad_mean.transpose(0, 1), weight.view(groups, c // groups, p)
                     .transpose(1, 2)).transpose(0, 1).reshape(k, c)


def _patch_outer_(out: Tensor, coef: Tensor, grad_mean: Tensor) -> Tensor:
    """``out += sum_k coef[k, c] p_bar[k, g(c)]``, ``C x P'`` (the transpose of ``_patch_dot``)."""
    k, groups, p = grad_mean.shape
    if groups == 1:
        return out.addmm_(coef.t(), grad_mean.view(k, p))
    c = coef.shape[1]
    out.view(groups, c // groups, p).baddbmm_(coef.view(k, groups, c // groups).permute(1, 2, 0),
                                              grad_mean.transpose(0, 1))
    return out


class _CompensatedPool(torch.autograd.Function):
    """Compensate every slot of the window, apply the variance rule, pool: few large ops.

    Forward: each slot's ``(mean, var)`` moved to the current conv weight
    (``compensate``, for all ``K`` slots at once), the variance rule, then the
    pooled statistics of the step's entry and the used slots,
    ``mean = (m_s + sum_k m_k) / n`` and ``var = (v_s + (m_s - mean)^2 + sum_k
    (v_k + (m_k - mean)^2)) / n``. The step's entry is a constant here (its
    gradient reaches ``x`` analytically in ``_PooledBatchNorm``).

    Backward (only when the weight is an input that requires grad: the
    compensated backward): the exact derivative of the pooled statistics in
    the conv weight and bias, through the compensated slots (coefficient
    ``rho``) and, under several calls per step, through the step's earlier
    calls (entries taken with the current weight, coefficient 1). From the
    stored derivatives alone: one ``C x K`` by ``K x P'`` product for the
    mean patches and one ``K x C x P'`` product-sum for ``dvar/dW``.
    """

    @staticmethod
    def forward(ctx, weight, bias, step_mean, step_var, entries, earlier, rho, compensation,
                rule):
        dtype = step_mean.dtype
        mean, var, d_mean = entries.mean, entries.var, None
        if rho != 0 and entries.grad_mean is not None:
            mean, var, d_mean = _compensated(mean, var, entries.grad_mean, entries.grad_var,
                                             weight, bias, rho, compensation)
        # A dropped entry may be non-finite: it is replaced by 0 before any
        # arithmetic, so that no NaN reaches the pool or the gradient.
        pooled = is_finite(mean + var).logical_and_(entries.use)
        if rule == 'clamp':
            pooled_var = var.clamp_min(0)
        else:
            pooled.logical_and_(var >= 0)
            pooled_var = var
        alpha = pooled.to(dtype)
        count = alpha.sum(0).add_(1)
        mean_z = torch.where(pooled, mean, alpha)
        total = mean_z.sum(0).add_(step_mean).div_(count)
        dev = (mean_z - total).mul_(alpha)
        spread = torch.where(pooled, pooled_var, alpha).addcmul_(dev, dev).sum(0)
        step_dev = step_mean - total
        var_p = torch.addcmul(step_var, step_dev, step_dev).add_(spread).div_(count)
        ctx.set_materialize_grads(False)
        if ctx.needs_input_grad[0]:
            # Entries on the clamp carry no gradient through their variance.
            live = alpha if rule == 'exclude' else alpha * (var > 0)
            ctx.save_for_backward(count, alpha, dev, live, step_dev)
            # (mu, nu): the slots' d_mu, zeros where not pooled (no NaN in the backward).
            ctx.d_mean = None if d_mean is None else torch.where(pooled, d_mean, alpha)
            ctx.entries, ctx.earlier = entries, earlier
            ctx.rho, ctx.weight_meta = rho, (weight.shape, weight.dtype)
            ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(count, mean, var, pooled)
        return total, var_p, count, mean, var, pooled

    @staticmethod
    def backward(ctx, g_mean, g_var, *_):
        count, alpha, dev, live, step_dev = ctx.saved_tensors
        entries, earlier, rho = ctx.entries, ctx.earlier, ctx.rho
        # dL/dmean / n and dL/dvar / n (an output that got no gradient: zeros)
        g_mean, g_var = (torch.zeros_like(count) if g is None
                         else as_dtype(g, alpha.dtype).div(count)
                         for g in (g_mean, g_var))
        # Per slot: dmean/dm_k = 1/n, dvar/dm_k = 2 (m_k - mean)/n, dvar/dv_k = 1/n.
        coef_patch = torch.addcmul(alpha * g_mean, dev, g_var, value=2.0).mul_(rho)
        coef_var = live.mul(g_var)
        if rho != 1.0:
            coef_var.mul_(rho)
        if ctx.d_mean is not None:  # (mu, nu): var_c - rho^2 d^2, d = <p_bar, W> + b - m_old
            coef_patch.addcmul_(ctx.d_mean, coef_var, value=-2.0 * rho)
        shape, dtype = ctx.weight_meta
        if entries.grad_var is not None:
            grad_w = _slot_combination(entries.grad_var, coef_var)
            _patch_outer_(grad_w, coef_patch, entries.grad_mean)
            grad_b = coef_patch.sum(0)
        else:  # no derivatives kept (rho = 0): nothing through the past entries
            grad_w = count.new_zeros(shape[0], shape.numel() // shape[0])
            grad_b = torch.zeros_like(count)
        if earlier is not None:
            # The step's earlier calls, merged with this one (weight ``share`` for
            # this call): entries of the current weight, derivative 1.
            share = earlier.share
            g_step = torch.addcmul(g_mean, step_dev, g_var, value=2.0)
            coef_e = torch.addcmul(g_step, earlier.mean - earlier.step_mean, g_var,
                                   value=2.0).mul_(1.0 - share)
            coef_ev = g_var * (1.0 - share)
            _patch_outer_(grad_w, coef_e.unsqueeze(0), earlier.grad_mean.unsqueeze(0))
            grad_w.addcmul_(earlier.grad_var, coef_ev.unsqueeze(1))
            grad_b.add_(coef_e)
        grad_b = None if ctx.bias_dtype is None else as_dtype(grad_b, ctx.bias_dtype)
        return (as_dtype(grad_w.view(shape), dtype), grad_b, None, None, None, None, None, None,
                None)


class EarlierCalls(NamedTuple):
    """This step's earlier calls at one position, for the compensated backward.

    ``mean``/``grad_mean``/``grad_var``: their merged mean and derivatives; ``step_mean``: the mean of the whole step so far (earlier
    calls and this one); ``share``: this call's share of the step's positions.
    """
    mean: Tensor
    grad_mean: Tensor
    grad_var: Tensor
    step_mean: Tensor
    share: float | Tensor


def pool_compensated(step_mean: Tensor, step_var: Tensor, entries: WindowEntries,
                     weight: Tensor | None, bias: Tensor | None, rho: float,
                     compensation: str, rule: str, differentiable: bool = False,
                     earlier: EarlierCalls | None = None) -> PooledStats:
    """Pool the step's statistics with the window's slots, compensated to ``weight``.

    ``differentiable``: the pooled statistics are functions of the conv's
    ``weight`` and ``bias`` (the compensated backward); otherwise constants.
    """
    device = step_mean.device.type
    if compat.is_autocast_enabled(device):  # the statistics stay in their own dtype
        with torch.autocast(device, enabled=False):
            return pool_compensated(step_mean, step_var, entries, weight, bias, rho,
                                    compensation, rule, differentiable, earlier)
    if differentiable:
        return PooledStats(*_CompensatedPool.apply(weight, bias, step_mean, step_var, entries,
                                                   earlier, float(rho), compensation, rule))
    with torch.no_grad():
        return PooledStats(*_CompensatedPool.apply(
            None if weight is None else weight.detach(), None if bias is None else bias.detach(),
            step_mean, step_var, entries, None, float(rho), compensation, rule))


def bn_reductions(grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                  invstd: Tensor, eps: float, input_grad: bool = False
                  ) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(sum g x_hat, sum g)`` per channel, ``x_hat = (x - mean) invstd``: BN's backward
    reduction kernel, with the statistics given as its saved ones.

    What every device's kernel accepts (``batch_norm_backward_cuda`` in
    ``aten/src/ATen/native/cuda/Normalization.cu``): without the input gradient
    it skips its fused path and asserts that ``save_mean`` and ``save_invstd``
    are defined, so they are passed, with ``train=True`` (the CPU kernel then
    reads them too, where ``train=False`` would recompute ``invstd`` from the
    running variance). Its reduction allocates the weight and bias gradients
    with the weight's options: an undefined weight (``affine=False``) would
    leave them without a device, so a tensor of ones stands in (only its dtype
    and device are used: the input gradient is not asked for). ``grad`` and
    ``x`` share a dtype; ``weight``, ``mean`` and ``invstd`` are float32 when
    ``x`` is float16/bfloat16 (the kernels' mixed-precision mode).

    ``input_grad``: also BN's training input gradient for these statistics,
    ``(gamma invstd) (g - mean(g) - x_hat mean(g x_hat))``, from the same kernel
    (on CUDA its fused path); returns ``(that or None, sum g x_hat, sum g)``.
    """
    if weight is None:
        weight = torch.ones_like(mean)
    grad_x, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
        grad, x, weight, None, None, mean, invstd, True, eps, [input_grad, True, True])
    return grad_x, sum_g_xhat, sum_g


class _PooledBatchNorm(torch.autograd.Function):
    """BN's fused kernels with pooled statistics, and the exact gradient through this call's.

    Forward: ``gamma (x - mean) / sqrt(var + eps) + beta`` with the pooled
    ``(mean, var)``, BN's inference kernel (one pass, eps inside the sqrt).
    Backward: the pooled statistics depend on this call's batch mean and
    variance, each with per-channel weight ``w`` (1/k for a full window, times
    this call's share of the step's positions). Through them the input
    gradient is BN's training backward with the correction terms scaled by
    ``w``: ``(gamma / sigma) (g - w mean(g) - w x_hat mean(g x_hat))`` (this
    call's own mean cancels out), that is ``w`` times BN's training input
    gradient plus ``(1 - w) (gamma / sigma) g``: BN's backward kernel, given the
    weight ``gamma w``, gives the first with ``sum g`` and ``sum g x_hat`` in one call,
    one ``addcmul_`` the rest. Under SyncCBN the sums are all-reduced first, and the
    input gradient is written out from them (two ``addcmul`` passes).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, stat_weight, eps, count, group):
        # ``x`` is saved in its own dtype (float16/bfloat16 under autocast), as BN saves it;
        # the statistics and affine parameters are float32: BN's mixed-precision kernels.
        ctx.save_for_backward(x, weight, mean, var, stat_weight)
        ctx.eps, ctx.count, ctx.group = eps, count, group
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, var, stat_weight = ctx.saved_tensors
        invstd = torch.rsqrt(var + ctx.eps)
        scale = invstd if weight is None else weight * invstd        # gamma / sigma
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if ctx.group is None and x.numel() > 0:
            # w x BN's input gradient + (1 - w) scale g, in x's dtype: the first is the
            # kernel's own for the weight gamma w (its sums do not depend on the weight).
            grad_x, sum_g_xhat, sum_g = bn_reductions(
                grad, x, stat_weight if weight is None else weight * stat_weight, mean, invstd,
                ctx.eps, input_grad=True)
            rest = torch.rsub(stat_weight, 1.0).mul_(scale)
            grad_x.addcmul_(grad, as_dtype(rest, x.dtype).view(shape))
        else:
            if x.numel() == 0:  # an empty batch (BN's CPU kernel would divide by zero)
                sum_g_xhat, sum_g = mean.new_zeros(mean.shape), mean.new_zeros(mean.shape)
            else:
                _, sum_g_xhat, sum_g = bn_reductions(grad, x, weight, mean, invstd, ctx.eps)
            total_g, total_g_xhat = sum_g, sum_g_xhat
            if ctx.group is not None:
                # The statistics were over every device's positions: so is their gradient
                # (2C numbers, as SyncBN's backward; an empty batch takes part with zeros).
                # Parameter gradients stay local for DDP.
                totals = torch.cat([sum_g, sum_g_xhat])
                torch.distributed.all_reduce(totals, group=ctx.group)
                total_g, total_g_xhat = totals.chunk(2)
            # grad_x = scale g + slope x + offset, per channel: two passes over x.
            coef = (scale * stat_weight).div_(ctx.count)
            slope = (coef * total_g_xhat).mul_(invstd).neg_()
            offset = torch.addcmul(coef * total_g, slope, mean).neg_()
            # (In the statistics' dtype: float32 for a float16 ``x``, then back to x's dtype.)
            grad_x = torch.addcmul(offset.view(shape), x, slope.view(shape))
            grad_x.addcmul_(grad, scale.view(shape))
            grad_x = as_dtype(grad_x, x.dtype)
        needs = ctx.needs_input_grad
        grad_mean = grad_var = None
        if needs[3] or needs[4]:
            # Pooled statistics that carry gradient (past entries as functions of
            # the current conv weight): this device's own gradient, like any
            # parameter gradient under DDP; the all-reduced one above is for x.
            grad_mean = torch.mul(scale, sum_g).neg_()
            grad_var = (scale * sum_g_xhat).mul_(invstd).mul_(-0.5)
        return (grad_x, sum_g_xhat if needs[1] else None, sum_g if needs[2] else None,
                grad_mean, grad_var, None, None, None, None)


def pooled_batch_norm(x: Tensor, mean: Tensor, var: Tensor, stat_weight: Tensor,
                      weight: Tensor | None, bias: Tensor | None, eps: float,
                      count: int | Tensor | None = None, group=None) -> Tensor:
    """Normalise ``x`` with pooled statistics, with the gradient through this call's.

    ``mean``/``var``: the pooled statistics; ``stat_weight``: per channel, the
    weight of this call's statistics in the pool (``share / n``; 1 gives BN's
    training backward with the pooled statistics). The gradient through this
    call's statistics is analytic; the pooled ``mean``/``var`` pass gradient
    on only where they carry it for other reasons (``pool_compensated``),
    never back into this call's. ``count``: positions behind this call's
    statistics (all devices' with ``group``, whose backward then sums the
    statistics' gradient across the group).

    ``x`` stays in its dtype and is saved as it is: under float16/bfloat16
    autocast BN saves the half-precision input, and a float32 copy would
    double what the layer keeps for the backward. The statistics and the
    affine parameters are float32 (BN's kernels on every device take a
    half-precision input with float32 parameters, all four of them float32);
    the output is in ``x``'s dtype.
    """
    dtype = mean.dtype
    count = x.numel() // x.shape[1] if count is None else count
    if weight is not None and weight.dtype != dtype:
        weight = weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return _PooledBatchNorm.apply(x, weight, bias, mean, var, stat_weight, eps, count, group)


def empty_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The norm of an empty batch: an empty output that passes a (zero) gradient to
    the affine parameters, as BN's."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = x * weight.view(shape) if weight is not None else x.clone()
    return out + bias.view(shape) if bias is not None else out


def active_window(step: int, window_size: int, burn_in: int = 0, ramp: int = 0) -> int:
    """Number of steps pooled (the current one included) after ``step`` optimizer steps.

    Plain BN (1) during burn-in; then the full window at once, or, with
    ``ramp > 0``, a linear ramp reaching ``window_size`` ``ramp`` steps after
    burn-in.
    """
    if step < burn_in:
        return 1
    if ramp <= 0:
        return window_size
    return 1 + min(window_size - 1, ((step - burn_in + 1) * (window_size - 1)) // ramp)


def recording_starts(window_size: int, burn_in: int) -> int:
    """First step whose statistics must be kept so the window is full when burn-in ends."""
    return max(0, burn_in - (window_size - 1))
