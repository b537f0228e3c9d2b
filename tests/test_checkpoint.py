"""Checkpoints that plain ``torch.load(path)`` (``weights_only=True``) accepts.

A real (tiny) MMEngine Runner trains a conv + CBN model with ``CBNHook``, a
validation metric that returns a numpy scalar (as mmdet's do), ``save_best``,
LR schedulers and a dataset whose ``metainfo`` holds a numpy array: every
kind of object MMEngine 0.10.7 pickles into a checkpoint. The checks:

- without ``WeightsOnlyCheckpointHook`` torch refuses the file, and the
  globals it would need are exactly the ones ``cbn_plugin.checkpoint``
  documents (HistoryBuffer, numpy arrays / scalars / dtypes);
- with it, the file loads with plain ``torch.load`` in a fresh process that
  never imports the plugin (nor mmengine), and needs no global at all;
- decoding gives back the message hub and meta exactly, and a resumed Runner
  sees the same message hub, optimizer and CBN window state;
- a file holding an arbitrary pickled object is still refused, with torch's
  message, and its payload never runs.
"""
from __future__ import annotations

import collections
import copy
import io
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.registry import HOOKS, DefaultScope
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import cbn_plugin
from cbn_plugin import checkpoint as ckpt
from cbn_plugin.checkpoint import TAG, WeightsOnlyCheckpointHook


@pytest.fixture(autouse=True, scope='module')
def keep_default_scope():
    """A Runner makes its scope ('mmengine') the current one, process-wide: put
    back whatever scope other test modules (mmdet's) had set."""
    saved = dict(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict = type(DefaultScope._instance_dict)(saved)


# ---------------------------------------------------------------- a tiny Runner
class TinyCBNNet(BaseModel):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = cbn_plugin.CBN(4, window_size=2)
        self.head = nn.Linear(4, 1)

    def forward(self, x, y, mode='tensor'):
        out = self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
        if mode == 'loss':
            return dict(loss=((out - y) ** 2).mean())
        return out


class TinyData(Dataset):
    # mmengine stores the train dataset's metainfo in meta and the message hub.
    metainfo = dict(classes=('a', 'b'), palette=[(1, 2, 3), (4, 5, 6)],
                    weights=np.array([0.25, 0.75], dtype=np.float32))

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(x=torch.randn(1, 6, 6, generator=g), y=torch.tensor([float(i % 3)]))


class NumpyMetric(BaseMetric):
    """Returns numpy scalars, as mmdet's CocoMetric does."""

    def process(self, data_batch, data_samples):
        self.results.append(np.float64(len(data_samples)))

    def compute_metrics(self, results):
        return dict(score=np.float64(sum(results)) / 10)


class RecordHook(Hook):
    """Keeps a deep copy of what the Runner saves / what a resumed Runner holds."""

    priority = 'VERY_LOW'  # before_save_checkpoint runs before the LOWEST encoder

    def __init__(self):
        self.saved = {}
        self.resumed = None

    def before_save_checkpoint(self, runner, checkpoint):
        self.saved[checkpoint['meta']['epoch']] = copy.deepcopy(checkpoint)

    def before_train(self, runner):
        self.resumed = dict(message_hub=copy.deepcopy(runner.message_hub.state_dict()),
                            optimizer=copy.deepcopy(runner.optim_wrapper.state_dict()),
                            model=copy.deepcopy(runner.model.state_dict()),
                            epoch=runner.epoch, iter=runner.iter)


def make_runner(work_dir, name, max_epochs=2, encode=True, resume_from=None):
    record = RecordHook()
    hooks = [dict(type='CBNHook', burn_in_iters=1), record]
    if encode:
        hooks.append(dict(type='WeightsOnlyCheckpointHook'))
    loader = dict(dataset=TinyData(), batch_size=2, collate_fn=dict(type='default_collate'))
    runner = Runner(
        model=TinyCBNNet(), work_dir=str(work_dir), experiment_name=name,
        train_dataloader=dict(loader, sampler=dict(type='DefaultSampler', shuffle=True)),
        val_dataloader=dict(loader, sampler=dict(type='DefaultSampler', shuffle=False)),
        val_evaluator=dict(type=NumpyMetric), val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=3),
            dict(type='MultiStepLR', milestones=[1, 2], by_epoch=True)],
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs, val_interval=1),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, save_best='score',
                                      rule='greater'),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=hooks, randomness=dict(seed=0),
        resume=resume_from is not None, load_from=resume_from)
    return runner, record


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('runner')
    runner, record = make_runner(work_dir, f'ckpt_{id(work_dir)}')
    runner.train()
    return work_dir, record


# ---------------------------------------------------------------- helpers
def same(a, b) -> bool:
    """Deep equality that also compares types, numpy arrays and HistoryBuffers."""
    if type(a) is not type(b):
        return False
    if isinstance(a, HistoryBuffer):
        return a.max_length == b.max_length and all(same(x, y) for x, y in zip(a.data, b.data))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
            a, b, equal_nan=a.dtype.kind in 'fc')
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only=True, torch's default


# ---------------------------------------------------------------- the Runner's files
def test_runner_checkpoint_without_hook_is_refused_and_why(tmp_path):
    """The control: what MMEngine writes by itself, torch refuses by default."""
    runner, _ = make_runner(tmp_path, f'plain_{id(tmp_path)}', max_epochs=1, encode=False)
    runner.train()
    path = tmp_path / 'epoch_1.pth'
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        torch.load(path)
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in needed  # message hub scalars
    assert 'numpy.dtype' in needed and 'numpy.ndarray' in needed      # their arrays, metainfo
    assert any(g.endswith('multiarray.scalar') for g in needed)        # numpy scalars (eta, best)
    known = ('numpy.', 'mmengine.logging.history_buffer.HistoryBuffer', 'builtins.getattr')
    assert all(g.startswith(known) for g in needed), needed


def test_every_runner_checkpoint_loads_weights_only(trained):
    work_dir, _ = trained
    paths = sorted(work_dir.glob('*.pth'))
    assert {p.name for p in paths} >= {'epoch_1.pth', 'epoch_2.pth'}
    assert any(p.name.startswith('best_score') for p in paths)
    for path in paths:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
        loaded = torch.load(path)
        assert loaded['meta']['weights_only_format'] == ckpt.FORMAT
        # Tensors and the model's state_dict are untouched by the encoding.
        assert isinstance(loaded['state_dict'], collections.OrderedDict)
        assert 'bn.window_mean' in loaded['state_dict']  # CBN window state is saved


def test_loads_in_fresh_process_without_plugin(trained):
    work_dir, _ = trained
    script = textwrap.dedent(f"""
        import sys, torch
        ck = torch.load({str(work_dir / 'epoch_2.pth')!r})
        assert sorted(ck) == ['message_hub', 'meta', 'optimizer', 'param_schedulers',
                              'state_dict'], sorted(ck)
        assert not any(m.split('.')[0] in ('cbn_plugin', 'mmengine', 'mmdet')
                       for m in sys.modules), 'plugin or mmengine imported'
        hub = ck['message_hub']
        buf = hub['log_scalars']['train/loss']
        assert buf['{TAG}'] == 'HistoryBuffer', buf
        assert buf['log_history']['data'].dtype == torch.float64
        print('OK', ck['meta']['epoch'], len(hub['log_scalars']))
    """)
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         cwd=work_dir, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('OK 2 ')


def test_decoding_restores_message_hub_and_meta(trained):
    work_dir, record = trained
    for epoch in (1, 2):
        before = record.saved[epoch]
        after = ckpt.load_checkpoint(work_dir / f'epoch_{epoch}.pth')
        assert 'weights_only_format' not in after['meta']
        for key in ('meta', 'message_hub', 'param_schedulers', 'optimizer', 'state_dict'):
            assert same(after[key], before[key]), key
        runtime = after['message_hub']['runtime_info']
        assert type(runtime['eta']) is np.float64
        assert type(after['meta']['dataset_meta']['weights']) is np.ndarray
        assert all(type(b) is HistoryBuffer for b in after['message_hub']['log_scalars'].values())
    assert type(record.saved[2]['message_hub']['runtime_info']['best_score']) is np.float64


def test_resumed_runner_gets_the_same_state(trained, tmp_path):
    work_dir, record = trained
    runner, resumed = make_runner(tmp_path, f'resume_{id(tmp_path)}', max_epochs=3,
                                  resume_from=str(work_dir / 'epoch_2.pth'))
    runner.train()
    saved = record.saved[2]
    state = resumed.resumed
    assert (state['epoch'], state['iter']) == (2, 8)
    assert same(state['message_hub']['log_scalars'], saved['message_hub']['log_scalars'])
    for key in ('best_score', 'eta', 'dataset_meta', 'best_ckpt'):
        assert same(state['message_hub']['runtime_info'][key],
                    saved['message_hub']['runtime_info'][key]), key
    assert same(state['optimizer'], saved['optimizer'])
    assert int(state['model']['bn.num_steps']) == 8  # the CBN clock resumes
    assert torch.equal(state['model']['bn.window_mean'], saved['state_dict']['bn.window_mean'])
    assert (tmp_path / 'epoch_3.pth').exists()
    torch.load(tmp_path / 'epoch_3.pth')


# ---------------------------------------------------------------- refusals
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_arbitrary_pickled_object_is_refused(tmp_path):
    marker = tmp_path / 'payload_ran'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'meta': {'x': Payload(str(marker))}}, path)
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed') as err:
        torch.load(path)
    assert 'Unsupported global: GLOBAL io.open' in str(err.value)
    assert not marker.exists()
    # The plugin's loader is torch.load underneath: refused the same way.
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        ckpt.load_checkpoint(path)
    # A plain object of a class nobody allow-listed is refused too.
    torch.save({'meta': {'hub': HistoryBuffer([1.0], [1])}}, path)
    with pytest.raises(pickle.UnpicklingError, match='Unsupported global'):
        torch.load(path)
    assert not marker.exists()


def test_encoder_refuses_unknown_objects_with_their_path():
    with pytest.raises(TypeError, match=r"checkpoint\['meta'\]\['x'\]\[1\] is a .*Payload"):
        ckpt.encode_checkpoint({'meta': {'x': [1, Payload('unused')]}})
    with pytest.raises(TypeError, match='key of type'):
        ckpt.encode({np.int64(3): 1})
    with pytest.raises(ValueError, match='does not know'):
        ckpt.decode({TAG: 'os.system', 'cmd': 'true'})


# ---------------------------------------------------------------- the codec
CASES = {
    'float64 array': np.linspace(0, 1, 5),
    'float32 2d': np.arange(6, dtype=np.float32).reshape(2, 3),
    'non-contiguous': np.arange(12).reshape(3, 4)[:, ::2],
    'uint16': np.array([1, 65535], dtype=np.uint16),
    'bool': np.array([True, False]),
    'complex': np.array([1 + 2j]),
    'big-endian': np.array([1.5, 2.5], dtype='>f8'),
    '0-d': np.array(3.5),
    'empty': np.zeros((0, 3)),
    'str array': np.array(['cat', 'dog']),
    'object array': np.array([1, 'a', None], dtype=object),
    'datetime': np.array(['2020-01-01'], dtype='datetime64[D]'),
    'structured': np.zeros(2, dtype=[('a', '<i4'), ('b', '<f8')]),
    'np.float64': np.float64(0.1),
    'np.float32': np.float32(1 / 3),
    'np.int64': np.int64(-7),
    'np.bool_': np.bool_(True),
    'np.str_': np.str_('x'),
    'nan': np.float64('nan'),
    'dtype': np.dtype('float32'),
    'structured dtype': np.dtype([('a', '<i4'), ('b', '<f8', (2,))]),
    'HistoryBuffer': HistoryBuffer([1.0, 2.5], [1, 2], max_length=10),
    'empty HistoryBuffer': HistoryBuffer(),
    'ConfigDict': ConfigDict(a=1, b=dict(c=[1, 2])),
    'frozenset': frozenset({1, 2}),
    'dict with the tag key': {TAG: 'numpy.dtype', 'descr': '<f8'},
    'nested': {'a': [(np.float64(1), {'b': np.arange(2)})], 'c': {np.int64(1).item(): 'x'}},
}


@pytest.mark.parametrize('name', list(CASES))
def test_codec_round_trip_through_weights_only(name):
    value = CASES[name]
    encoded = ckpt.encode({'v': value})
    decoded = ckpt.decode(roundtrip(encoded))['v']
    if isinstance(value, ConfigDict):
        assert type(decoded) is ConfigDict and decoded.to_dict() == value.to_dict()
    elif isinstance(value, np.ndarray) and value.dtype.kind == 'V':
        assert decoded.dtype == value.dtype and decoded.tobytes() == value.tobytes()
    else:
        assert same(decoded, value), (decoded, value)


def test_plain_data_is_left_alone():
    state = collections.OrderedDict(w=torch.ones(2), n=torch.tensor(3))
    state._metadata = collections.OrderedDict({'': {'version': 2}})
    checkpoint = {'state_dict': state, 'meta': {'epoch': 1, 'cfg': 'x', 'l': [1, (2, 3)]},
                  'optimizer': {'state': {0: {'m': torch.zeros(2)}}, 'groups': [{'lr': 0.1}]},
                  'sched': [{'milestones': collections.Counter({8: 1})}]}
    parts = {k: checkpoint[k] for k in ('state_dict', 'optimizer', 'sched')}
    ckpt.encode_checkpoint(checkpoint)
    assert all(checkpoint[k] is v for k, v in parts.items())  # not even copied
    mixed = collections.OrderedDict(w=torch.ones(1), s=np.float64(2))
    mixed._metadata = {'': {'version': 2}}
    encoded = ckpt.encode(mixed)
    assert type(encoded) is collections.OrderedDict and encoded._metadata is mixed._metadata
    assert encoded['w'] is mixed['w']


def test_hook_registered_and_added_once():
    assert HOOKS.get('WeightsOnlyCheckpointHook') is WeightsOnlyCheckpointHook
    assert WeightsOnlyCheckpointHook.priority == 'LOWEST'
    cfg = ConfigDict(custom_hooks=[dict(type='CBNHook', burn_in_iters=1)])
    assert ckpt.add_weights_only_hook(cfg)
    assert not ckpt.add_weights_only_hook(cfg)
    assert [h['type'] for h in cfg.custom_hooks] == ['CBNHook', 'WeightsOnlyCheckpointHook']
    assert ckpt.add_weights_only_hook(empty := ConfigDict())
    assert empty.custom_hooks == [dict(type='WeightsOnlyCheckpointHook')]
    off = ConfigDict(weights_only_checkpoints=False)
    assert not ckpt.add_weights_only_hook(off) and 'custom_hooks' not in off
