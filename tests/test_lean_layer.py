"""The inputs BN takes, a compiled model, and the layer's host work per step.

Empty batches (a RoI head without RoIs), channels_last tensors, torch.fx and
torch.jit tracing for deployment, torch.compile with a bounded number of
graphs, and the number of aten ops a training step dispatches (a
``TorchDispatchMode`` counter: deterministic, unlike a clock).
"""
import collections
import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import cbn_plugin
from cbn_plugin import CBN


def conv_cbn(channels=6, **cbn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False),
                          CBN(channels, window_size=3, **cbn), nn.ReLU(),
                          nn.Conv2d(channels, channels, 1, bias=False),
                          CBN(channels, window_size=3, **cbn))
    cbn_plugin.bind(model, logger=None)
    return model


def train(model, steps, batches, memory_format=torch.contiguous_format):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs = []
    for i in range(steps):
        x = batches[i].detach().to(memory_format=memory_format).requires_grad_(True)
        out = model(x)
        out.square().mean().backward()
        outs.append((out.detach().contiguous(), x.grad.contiguous()))
        opt.step()
        opt.zero_grad()
        cbn_plugin.step(model)
    return outs


def batches(n, shape=(2, 3, 5, 5), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) + 1 for _ in range(n)]


# ----------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize('mode', ['default', 'paper'])
def test_empty_batch_is_an_empty_output_and_changes_nothing_but_the_batch_count(mode):
    model = conv_cbn(mode=mode)
    data = batches(6)
    twin = copy.deepcopy(model)
    cbn_plugin.bind(twin, logger=None)
    train(model, 4, data)
    train(twin, 4, data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert out.shape == (0, 6, 5, 5)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    after = model.state_dict()
    for key in before:
        if key.endswith('num_batches_tracked'):  # counted, as nn.BatchNorm2d counts it
            assert int(after[key]) == int(before[key]) + 1
        else:
            assert torch.equal(before[key], after[key]), key
    # Training goes on exactly as if the empty batch had not been there.
    model.zero_grad()
    cbn_plugin.step(twin)  # the empty batch's step, for the twin too: no record either way
    cbn_plugin.step(model)
    for (a, ga), (b, gb) in zip(train(model, 2, data[4:]), train(twin, 2, data[4:])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def test_empty_batch_as_plain_bn_matches_batchnorm():
    layer, bn = CBN(4, window_size=1), nn.BatchNorm2d(4)
    cbn_plugin.bind(nn.Sequential(layer), logger=None)
    x = torch.randn(0, 4, 3, 3)
    assert layer(x).shape == bn(x).shape == (0, 4, 3, 3)
    for key, value in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key


# ----------------------------------------------------------------------------- memory format
@pytest.mark.parametrize('mode', ['default', 'paper'])
def test_channels_last_equals_contiguous(mode):
    data = batches(6)
    contiguous = conv_cbn(mode=mode)
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    cbn_plugin.bind(channels_last, logger=None)
    expect = train(contiguous, 6, data)
    got = train(channels_last, 6, data, torch.channels_last)
    # The convs' kernels differ by memory format (float rounding, grown over 6 steps).
    for (a, ga), (b, gb) in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
    for p, q in zip(channels_last.parameters(), contiguous.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- deployment
def test_eval_mode_traces_with_fx_and_jit():
    model = conv_cbn()
    train(model, 4, batches(4))
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    expect = model(x)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), expect)
    scripted = torch.jit.trace(model, x)
    torch.testing.assert_close(scripted(x), expect)


def test_fx_trace_in_training_mode_is_a_clear_error():
    model = conv_cbn()
    with pytest.raises(RuntimeError, match='eval mode.*convert_to_bn'):
        torch.fx.symbolic_trace(model)


# ----------------------------------------------------------------------------- compile
def compiled_and_eager(window, steps, burn_in=0, ramp=0, momentum=0.1, log_every=0,
                       fullgraph_layer=False):
    """Train a conv + CBN stack compiled (aot_eager) and its eager twin side by side, as
    CBNHook would (the schedule, diagnostics on logging iterations); return dynamo's counters."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False),
                          CBN(6, window_size=window, momentum=momentum), nn.ReLU(),
                          nn.Conv2d(6, 6, 1, bias=False), CBN(6, window_size=window,
                                                              momentum=momentum))
    model = copy.deepcopy(eager)
    for m in (model, eager):
        cbn_plugin.bind(m, logger=None)
        for layer in (m[1], m[4]):
            layer.set_schedule(burn_in, ramp)
    if fullgraph_layer:  # the layers alone, each a graph that must not break
        for i in (1, 4):
            model[i].forward = torch.compile(model[i].forward, backend='aot_eager',
                                             fullgraph=True)
        compiled = model
    else:
        compiled = torch.compile(model, backend='aot_eager')
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, eager)]
    for i, x in enumerate(batches(steps)):
        for m in (model, eager):
            m[1].track_diagnostics = m[4].track_diagnostics = bool(log_every) and \
                i % log_every == 0
        out, expect = compiled(x), eager(x)
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
        out.square().mean().backward()
        expect.square().mean().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        cbn_plugin.step(model)
        cbn_plugin.step(eager)
    assert model[4].diagnostics['window'] == eager[4].diagnostics['window'] == window
    for a, b in zip(model.state_dict().values(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return counters


@pytest.mark.parametrize('setting', [
    dict(),                                           # the window from the first step
    dict(burn_in=70, ramp=20, momentum=None, log_every=5),  # plain BN, recording, a ramp
])
def test_compiled_model_trains_like_eager_at_the_windows_users_get(setting):
    """k = 32 (CBNHook's window at 1 image per step) over 2k steps and more than dynamo's
    recompile limit (8): a few graphs, none per step, no graph break; the numbers are
    eager's. Phases that each take a graph: plain BN (burn-in), recording (its last
    k - 1 steps), pooling, pooling with diagnostics (a logging iteration)."""
    steps = 2 * 32 + setting.get('burn_in', 0)
    counters = compiled_and_eager(32, steps, **setting)
    assert counters['stats']['unique_graphs'] <= 4
    assert sum(counters['graph_break'].values()) == 0


def test_layer_forward_compiles_as_one_graph():
    """``fullgraph=True`` on the layer's forward: dynamo would raise at a graph break."""
    counters = compiled_and_eager(16, 24, ramp=8, momentum=None, log_every=3,
                                  fullgraph_layer=True)
    assert sum(counters['graph_break'].values()) == 0


@pytest.mark.parametrize('per_call_windows', [False, True])
def test_window_buffers_are_allocated_once(per_call_windows):
    """What a captured step (CUDA graphs) needs of the state: every buffer keeps its
    storage from the first step's end on, the window written in place at every step."""
    model = conv_cbn(per_call_windows=per_call_windows)
    data = batches(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    storage = None
    for i in range(10):
        for call in range(2):  # two calls per step: accumulation, or two call positions
            model(data[(i + call) % 10]).square().mean().backward()
        opt.step()
        opt.zero_grad()
        cbn_plugin.step(model)
        now = {name: t.data_ptr() for name, t in model.named_buffers()}
        storage = storage or now
        assert now == storage, i
    assert int(model[1].window_filled.min()) == 2  # the ring (window 3) is full


class KernelLog(TorchDispatchMode):
    """Each aten call: the op, its tensors' layouts (shape, stride, offset into storage),
    its other arguments: what a captured CUDA graph would replay."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_flatten((args, kwargs or {}))[0]
        self.calls.append((str(func), tuple(
            (tuple(a.shape), a.stride(), a.storage_offset()) if isinstance(a, torch.Tensor)
            else a for a in flat)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('per_call_windows', [False, True])
def test_step_issues_the_same_kernels_at_every_step(per_call_windows):
    """``cbn_plugin.step`` writes the window with a device index: at every step the same
    ops on the same tensors' layouts with the same arguments, so a step captured once (a
    CUDA graph) replays as the next steps would run. A slot chosen on the host shows
    here as a write at another offset, or another number filled in."""
    model = conv_cbn(per_call_windows=per_call_windows)
    data = batches(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logs = []
    for i in range(8):
        for call in range(2):
            model(data[(i + call) % 8]).square().mean().backward()
        opt.step()
        opt.zero_grad()
        log = KernelLog()
        with log:
            cbn_plugin.step(model)
        logs.append(log.calls)
    assert logs[3] and all(log == logs[3] for log in logs[3:]), \
        [next((a, b) for a, b in zip(log, logs[3]) if a != b) for log in logs[3:] if log != logs[3]]


# ----------------------------------------------------------------------------- host work
class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_per_layer_step(norm, layers=(1, 3), **cbn):
    counts = []
    for n in layers:
        torch.manual_seed(0)
        stack = []
        for _ in range(n):
            stack += [nn.Conv2d(8, 8, 1, bias=False), norm(8, **cbn), nn.ReLU()]
        model = nn.Sequential(*stack)
        if norm is CBN:
            cbn_plugin.bind(model, logger=None)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(1, 8, 4, 4)
        for step in range(6):
            counter = OpCounter()
            with counter if step == 5 else contextlib.nullcontext():  # count the last
                opt.zero_grad()
                model(x).sum().backward()
                opt.step()
                cbn_plugin.step(model)
        counts.append(sum(counter.ops.values()))
    return (counts[1] - counts[0]) / (layers[1] - layers[0])


def test_steady_state_step_dispatches_few_ops_per_layer():
    """The lean layer's budget: a regression that adds per-step ops fails here.
    (The figures and their comparison with BN are in docs/benchmarks.md.)"""
    bn = ops_per_layer_step(nn.BatchNorm2d)
    cbn = ops_per_layer_step(CBN, window_size=4)
    assert bn == 22
    # 128 before the window's write became an indexed one on the device (capturable, 5
    # more ops), the step-start copy of the running statistics one op (1 fewer), the
    # input gradient BN's own kernel's (8 fewer), and the running statistics, finiteness
    # checks and ring counters made for every layer at once at the step's end (20 fewer)
    assert cbn <= 104, cbn


# ----------------------------------------------------------------------------- Mask R-CNN
def test_mask_rcnn_trains_through_an_image_without_annotations():
    """A CBN mask head gets no RoI on an image without objects (``filter_empty_gt=False``):
    the step trains on, the mask head records nothing for it, and the next steps pool."""
    from mmengine.hub import get_config
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = get_config('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py').model
    cfg.backbone.update(depth=18, init_cfg=None, frozen_stages=-1, norm_eval=False)
    cfg.neck.update(in_channels=[64, 128, 256, 512], out_channels=32)
    cfg.rpn_head.update(in_channels=32, feat_channels=32)
    cfg.roi_head.bbox_roi_extractor.update(out_channels=32)
    cfg.roi_head.mask_roi_extractor.update(out_channels=32)
    cfg.roi_head.bbox_head.update(in_channels=32, fc_out_channels=64, num_classes=3)
    cfg.roi_head.mask_head.update(in_channels=32, conv_out_channels=32, num_classes=3,
                                  norm_cfg=dict(type='CBN', window_size=3))
    cfg.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
    cfg.train_cfg.rcnn.sampler.update(num=32)
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    cbn_plugin.bind(model, logger=None)
    mask_norms = [m for n, m in model.named_modules()
                  if n.startswith('roi_head.mask_head') and isinstance(m, CBN)]
    assert len(mask_norms) == 4
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    recorded = []
    for objects in (2, 0, 2, 2, 0, 2):
        batch = demo_mm_inputs(1, (3, 64, 64), num_items=[objects], num_classes=3,
                               with_mask=True)
        data = model.data_preprocessor(batch, True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cbn_plugin.step(model)
        recorded.append(int(mask_norms[0].window_filled[0]))
    # Only steps with RoIs are recorded: 1, -, 2, 2 (full: k - 1), -, 2.
    assert recorded == [1, 1, 2, 2, 2, 2]
    assert all(torch.isfinite(m.running_var).all() for m in mask_norms)
