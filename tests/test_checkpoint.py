"""Checkpoints that plain ``torch.load(path)`` (``weights_only=True``) accepts.

A real (tiny) MMEngine Runner trains a conv + CBN model with ``CBNHook``, a
validation metric that returns a numpy scalar (as mmdet's do), ``save_best``,
LR schedulers and a dataset whose ``metainfo`` holds a numpy array: every
kind of object MMEngine 0.10.7 pickles into a checkpoint. The checks:

- without ``WeightsOnlyCheckpointHook`` torch refuses the file, and the
  globals it would need are exactly the ones ``docs/checkpoints.md``
  documents (HistoryBuffer, numpy arrays / scalars / dtypes);
- with it, the file loads with plain ``torch.load`` in a fresh process that
  never imports the plugin (nor mmengine), and needs no global at all;
- decoding gives back the message hub and meta exactly, and a resumed Runner
  sees the same message hub, optimizer and CBN window state;
- a file holding an arbitrary pickled object is still refused, with torch's
  message, and its payload never runs;
- the RNG states (torch, numpy, python ``random``) travel through the file
  in weights_only form, and a resumed Runner whose model, data and metric
  all draw random numbers ends bit-identical to an uninterrupted one (and
  differs without the RNG restore);
- a checkpoint write that fails midway (here: the rewrite of the newest
  checkpoint that ``save_best`` does) leaves the previous complete file in
  place, where plain MMEngine leaves a truncated file that ``last_checkpoint``
  names;
- truncated, corrupt, empty, missing and non-checkpoint files are refused
  before loading, with an error naming the file;
- each of the five hooks (``CheckpointFileCheckHook``, ``AtomicCheckpointHook``,
  ``RankStateHook``, ``ResumeRNGHook``, ``CheckpointCodecHook``) does its part
  alone, with a control without it that shows the part missing; listed
  twice (and beside ``WeightsOnlyCheckpointHook``) they act once.
"""
from __future__ import annotations

import collections
import copy
import io
import os
import pickle
import random
import re
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import cbn_plugin
from cbn_plugin import engine as ckpt
from cbn_plugin.engine import TAG, CheckpointFileError, WeightsOnlyCheckpointHook
from cbn_plugin.engine import atomic_hook, concern, rank_state_hook, rng_hook
import helpers
from helpers import ToyData, ToyNet, tiny_runner

pytestmark = pytest.mark.usefixtures('keep_default_scope')
# Plain torch.load's weights_only=True default is torch 2.6's (and
# get_unsafe_globals_in_checkpoint 2.5's): before it torch.load unpickles fully, and so do
# the plugin's loads (cbn_plugin/versions.py). What plain torch.load refuses is tested from
# 2.6 on; the oldest lane (torch 2.1) runs the rest.
WEIGHTS_ONLY_DEFAULT = torch.__version__ >= '2.6'
needs_weights_only_default = pytest.mark.skipif(
    not WEIGHTS_ONLY_DEFAULT, reason=f'torch {torch.__version__} < 2.6: torch.load unpickles '
    'fully by default (weights_only=True is the default from 2.6)')


# ---------------------------------------------------------------- a tiny Runner
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


# The checkpoint hooks one by one, in the order the tools list them.
SPLIT = ('CheckpointFileCheckHook', 'AtomicCheckpointHook', 'RankStateHook', 'ResumeRNGHook',
         'CheckpointCodecHook')


def split_hooks(*names, **args) -> list[dict]:
    """``dict(type=name)`` of each of ``names`` (default: all of :data:`SPLIT`); ``args``
    go to the hook whose type is the key (``RankStateHook=dict(save_buffers=False)``)."""
    return [dict(type=name, **args.get(name, {})) for name in (names or SPLIT)]


def make_runner(work_dir, name, max_epochs=2, encode=True, resume_from=None,
                ckpt_hooks=None):
    """``ckpt_hooks``: the checkpoint hooks (default: ``WeightsOnlyCheckpointHook`` if
    ``encode``, else none)."""
    record = RecordHook()
    hooks = [dict(type='CBNHook', burn_in_iters=1), record]
    if ckpt_hooks is not None:
        hooks += ckpt_hooks
    elif encode:
        hooks.append(dict(type='WeightsOnlyCheckpointHook'))
    runner = tiny_runner(
        work_dir, ToyNet(), ToyData(), hooks=hooks, max_epochs=max_epochs, momentum=0.9,
        metric=NumpyMetric, experiment_name=name, resume_from=resume_from,
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=3),
            dict(type='MultiStepLR', milestones=[1, 2], by_epoch=True)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, save_best='score',
                                           rule='greater'),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0))
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
@needs_weights_only_default
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


@needs_weights_only_default
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
                              'rng_state', 'state_dict'], sorted(ck)
        assert not any(m.split('.')[0] in ('cbn_plugin', 'mmengine', 'mmdet')
                       for m in sys.modules), 'plugin or mmengine imported'
        hub = ck['message_hub']
        buf = hub['log_scalars']['train/loss']
        assert buf['{TAG}'] == 'HistoryBuffer', buf
        assert buf['log_history']['data'].dtype == torch.float64
        rng = ck['rng_state']
        assert rng['torch'].dtype == torch.uint8 and rng['numpy']['keys'].shape == (624,)
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


@needs_weights_only_default
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
    # weights_only_checkpoints=False switches the encoding off, nothing else.
    off = ConfigDict(weights_only_checkpoints=False)
    assert ckpt.add_weights_only_hook(off)
    assert off.custom_hooks == [dict(type='WeightsOnlyCheckpointHook', encode=False)]


@pytest.mark.parametrize('key, arg', list(ckpt.CONFIG_SWITCHES.items()))
def test_each_config_switch_turns_off_its_part_only(key, arg):
    assert set(ckpt.CONFIG_SWITCHES.values()) == {
        'encode', 'restore_rng', 'rank_states', 'atomic_save', 'check_files'}
    cfg = ConfigDict({key: False})
    assert ckpt.add_weights_only_hook(cfg)
    assert cfg.custom_hooks == [dict(type='WeightsOnlyCheckpointHook', **{arg: False})]
    hook = HOOKS.build(cfg.custom_hooks[0])
    for other in ckpt.CONFIG_SWITCHES.values():
        assert getattr(hook, other) is (other != arg), other
    # True is the default and adds nothing to the hook's arguments.
    on = ConfigDict({key: True})
    ckpt.add_weights_only_hook(on)
    assert on.custom_hooks == [dict(type='WeightsOnlyCheckpointHook')]
    with pytest.raises(ValueError, match=f"config {key}='no': must be True or False"):
        ckpt.add_weights_only_hook(ConfigDict({key: 'no'}))
    # Said twice, differently: refused, naming both.
    listed = ConfigDict({key: False, 'custom_hooks': [dict(type='WeightsOnlyCheckpointHook')]})
    with pytest.raises(ValueError, match=f'config {key}=False contradicts .*{arg}=True'):
        ckpt.add_weights_only_hook(listed)
    agreed = ConfigDict({key: False, 'custom_hooks': [
        dict(type='WeightsOnlyCheckpointHook', **{arg: False})]})
    assert not ckpt.add_weights_only_hook(agreed)
    with pytest.raises(ValueError, match=f'WeightsOnlyCheckpointHook {arg} must be True or '
                                         "False, got 'yes'"):
        WeightsOnlyCheckpointHook(**{arg: 'yes'})


# ---------------------------------------------------------------- RNG state
def draws():
    return (torch.rand(3), torch.randn(2), np.random.rand(2), np.random.randn(1),
            random.random(), random.gauss(0, 1))


def test_rng_state_round_trip_through_weights_only():
    random.gauss(0, 1)  # leaves a cached second gaussian (gauss_next)
    np.random.randn(1)  # leaves numpy's cached gaussian
    if torch.cuda.is_available():
        torch.cuda.init()
    state = ckpt.get_rng_state()
    expected = draws() + ((torch.rand(4, device='cuda').cpu(),) if 'cuda' in state else ())
    assert set(state) >= {'format', 'world_size', 'torch', 'numpy', 'random'}
    assert ckpt.encode(state) is state  # plain data: nothing to encode
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    restored = ckpt.set_rng_state(roundtrip(state))
    assert restored[:3] == ['torch', 'numpy', 'random']
    again = draws() + ((torch.rand(4, device='cuda').cpu(),) if 'cuda' in state else ())
    assert same(again, expected)
    with pytest.raises(ValueError, match='format'):
        ckpt.set_rng_state(dict(state, format=99))


class NoisyData(ToyData):
    """Augmentation from numpy's and python's global generators (as mmcv's transforms)."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        noise = torch.from_numpy(np.random.randn(1, 6, 6).astype(np.float32))
        item['x'] = item['x'] + 0.1 * noise + random.random()
        return item


class DrawingMetric(NumpyMetric):
    """A validation that consumes random numbers of every kind."""

    def process(self, data_batch, data_samples):
        torch.rand(1), np.random.rand(), random.random()
        super().process(data_batch, data_samples)


def make_noisy_runner(work_dir, name, max_epochs, resume_from=None, ckpt_hooks=None,
                      **hook_args):
    """A Runner whose model (dropout), data and validation all draw random numbers.

    ``ckpt_hooks``: the checkpoint hooks (default: ``WeightsOnlyCheckpointHook``
    with ``hook_args``).
    """
    torch.manual_seed(1)  # the model is built before the Runner seeds
    if ckpt_hooks is None:
        ckpt_hooks = [dict(type='WeightsOnlyCheckpointHook', **hook_args)]
    return tiny_runner(
        work_dir, ToyNet(dropout=0.5), NoisyData(), max_epochs=max_epochs, lr=0.05,
        momentum=0.9, metric=DrawingMetric, experiment_name=name, resume_from=resume_from,
        hooks=[dict(type='CBNHook', burn_in_iters=1), *ckpt_hooks],
        randomness=dict(seed=0))


def final_state(runner) -> dict:
    runner.train()
    return {k: v.clone() for k, v in runner.model.state_dict().items()}


@pytest.mark.parametrize('kit', ['bundle', 'split'])
def test_resume_is_bit_exact_with_random_model_data_and_validation(tmp_path, kit):
    """3 epochs at once == 2 epochs, then a new Runner resumed for the 3rd.

    Validation runs after every epoch and draws random numbers; the hook
    keeps them out of the training stream, so the run that validated after
    epoch 2 and the resumed one (which did not) continue alike. With
    ``WeightsOnlyCheckpointHook`` and with the five hooks listed one by one
    (``ResumeRNGHook`` the one that matters here).
    """
    hooks = None if kit == 'bundle' else split_hooks()
    whole = final_state(make_noisy_runner(tmp_path / 'whole', f'whole_{id(tmp_path)}', 3,
                                          ckpt_hooks=hooks))
    first = make_noisy_runner(tmp_path / 'part', f'part_{id(tmp_path)}', 2, ckpt_hooks=hooks)
    first.train()
    assert 'rng_state' in torch.load(tmp_path / 'part' / 'epoch_2.pth')
    resumed = final_state(make_noisy_runner(tmp_path / 'resumed', f'res_{id(tmp_path)}', 3,
                                            resume_from=str(tmp_path / 'part' / 'epoch_2.pth'),
                                            ckpt_hooks=hooks))
    assert int(whole['bn.num_steps']) == 12 and whole['bn.window_mean'] is not None
    assert list(resumed) == list(whole)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole), \
        [k for k in whole if not torch.equal(resumed[k], whole[k])]
    # The control: without the RNG restore the resumed run draws other numbers.
    plain = final_state(make_noisy_runner(
        tmp_path / 'plain', f'plain_{id(tmp_path)}', 3, restore_rng=False,
        ckpt_hooks=None if kit == 'bundle' else split_hooks(
            *(n for n in SPLIT if n != 'ResumeRNGHook')),
        resume_from=str(tmp_path / 'part' / 'epoch_2.pth')))
    assert not torch.equal(plain['head.weight'], whole['head.weight'])


def test_load_from_does_not_restore_rng(tmp_path, trained):
    """Fine-tuning from a checkpoint (load_from, no resume) keeps the run's own seed."""
    work_dir, _ = trained
    runner, _ = make_runner(tmp_path, f'finetune_{id(tmp_path)}', max_epochs=1)
    hook = next(h for h in runner.hooks if isinstance(h, WeightsOnlyCheckpointHook))
    hook.before_run(runner)
    runner.load_checkpoint(str(work_dir / 'epoch_1.pth'))  # what load_from does
    seeded = ckpt.get_rng_state()
    hook.before_train(runner)  # iter 0 != the checkpoint's: not a resume
    assert same(ckpt.get_rng_state(), seeded)
    hook.after_run(runner)


# ---------------------------------------------------------------- atomic writes
def failing_put(monkeypatch, name: str, nth: int):
    """Make the ``nth`` write of a file whose name starts with ``name`` stop halfway."""
    from mmengine.fileio.backends.local_backend import LocalBackend
    put, seen = LocalBackend.put, []

    def half_put(self, obj, filepath):
        if os.path.basename(str(filepath)).startswith(name):
            seen.append(str(filepath))
            if len(seen) == nth:
                with open(filepath, 'wb') as f:
                    f.write(obj[:len(obj) // 2])
                raise OSError(28, 'No space left on device (simulated)')
        return put(self, obj, filepath)

    monkeypatch.setattr(LocalBackend, 'put', half_put)
    return seen


@pytest.mark.parametrize('atomic', [True, False])
def test_rewrite_of_newest_checkpoint_fails_midway(tmp_path, monkeypatch, atomic):
    """``save_best`` rewrites epoch_1.pth in place after the validation improves.

    The write fails halfway. With the hook, epoch_1.pth is still the first,
    complete version; plain MMEngine (``atomic_save=False``) leaves a
    truncated epoch_1.pth that ``last_checkpoint`` names, so auto-resume would
    read it.
    """
    seen = failing_put(monkeypatch, 'epoch_1.pth', nth=2)
    runner, _ = make_runner(tmp_path, f'atomic{atomic}_{id(tmp_path)}', max_epochs=1)
    hook = next(h for h in runner.hooks if isinstance(h, WeightsOnlyCheckpointHook))
    hook.atomic_save = atomic
    with pytest.raises(OSError, match='simulated'):
        runner.train()
    assert len(seen) == 2
    path = tmp_path / 'epoch_1.pth'
    assert (tmp_path / 'last_checkpoint').read_text() == str(path)
    if not atomic:
        with pytest.raises(CheckpointFileError, match='truncated'):
            ckpt.check_checkpoint_file(path)
        return
    assert all('.partial-' in p for p in seen)
    assert not list(tmp_path.glob('*.partial-*'))  # the failed write is cleaned up
    ckpt.check_checkpoint_file(path)
    first = ckpt.load_checkpoint(path)
    assert first['meta']['epoch'] == 1
    assert 'best_score' not in first['message_hub']['runtime_info']  # the first version


def test_atomic_save_is_undone_after_run(trained, monkeypatch):
    """Wrapped once however often ``before_run`` runs (one partial file per save), and
    after the run the Runner's own ``save_checkpoint`` writes in place again."""
    from mmengine.fileio.backends.local_backend import LocalBackend
    put, written = LocalBackend.put, []

    def recording_put(self, obj, filepath):
        written.append(os.path.basename(str(filepath)))
        return put(self, obj, filepath)

    monkeypatch.setattr(LocalBackend, 'put', recording_put)
    work_dir, _ = trained
    runner, _ = make_runner(work_dir, f'undo_{id(work_dir)}', max_epochs=1)
    hook = next(h for h in runner.hooks if isinstance(h, WeightsOnlyCheckpointHook))
    hook.before_run(runner)
    hook.before_run(runner)  # wrapped once only
    no_optimizer = dict(save_optimizer=False, save_param_scheduler=False)
    runner.save_checkpoint(str(work_dir), 'undo_a.pth', **no_optimizer)
    assert written == [f'undo_a.pth.partial-{os.getpid()}']
    hook.after_run(runner)
    assert 'save_checkpoint' not in runner.__dict__
    runner.save_checkpoint(str(work_dir), 'undo_b.pth', **no_optimizer)
    assert written[1:] == ['undo_b.pth']


# ---------------------------------------------------------------- damaged files
def tensor_byte(path) -> int:
    """The offset of a byte in the middle of the largest tensor's data in a torch.save file."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if '/data/' in i.filename),
                   key=lambda i: i.file_size)
    with open(path, 'rb') as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the local file header: name and extra lengths at 26 and 28
    name_len, extra_len = struct.unpack('<HH', header[26:30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


@pytest.fixture(scope='module')
def damaged(tmp_path_factory, trained):
    work_dir, _ = trained
    good = (work_dir / 'epoch_1.pth').read_bytes()
    tmp = tmp_path_factory.mktemp('damaged')
    files = {'truncated': good[:len(good) // 2], 'tail cut': good[:-10],
             'garbage': b'this is not a checkpoint\n' * 8, 'empty': b'', 'good': good}
    flipped = bytearray(good)
    flipped[tensor_byte(work_dir / 'epoch_1.pth')] ^= 0x10
    files['bit flip'] = bytes(flipped)
    paths = {}
    for name, data in files.items():
        paths[name] = tmp / f"{name.replace(' ', '_')}.pth"
        paths[name].write_bytes(data)
    buffer = io.BytesIO()
    torch.save({'w': torch.ones(3)}, buffer, _use_new_zipfile_serialization=False)
    paths['legacy'] = tmp / 'legacy.pth'
    paths['legacy'].write_bytes(buffer.getvalue())
    import zipfile
    paths['zip'] = tmp / 'other.zip'
    with zipfile.ZipFile(paths['zip'], 'w') as archive:
        archive.writestr('readme.txt', 'hello')
    paths['missing'] = tmp / 'missing.pth'
    paths['directory'] = tmp
    return paths


@pytest.mark.parametrize('name, error, message', [
    ('truncated', CheckpointFileError, 'is truncated'),
    ('tail cut', CheckpointFileError, 'is truncated'),
    ('garbage', CheckpointFileError, 'is not a PyTorch checkpoint'),
    ('empty', CheckpointFileError, r'is empty \(0 bytes\)'),
    ('bit flip', CheckpointFileError, 'fails the CRC-32 check'),
    ('zip', CheckpointFileError, 'not a torch.save file'),
    ('missing', FileNotFoundError, 'does not exist'),
    ('directory', CheckpointFileError, 'is not a file'),
])
def test_check_checkpoint_file_refuses(damaged, name, error, message):
    path = damaged[name]
    with pytest.raises(error, match=message) as err:
        ckpt.check_checkpoint_file(path)
    assert str(path) in str(err.value)


def test_check_checkpoint_file_accepts(damaged):
    ckpt.check_checkpoint_file(damaged['good'])
    ckpt.check_checkpoint_file(damaged['legacy'])  # torch's pre-1.6 format, unchecked
    ckpt.check_checkpoint_file(damaged['bit flip'], crc=False)  # only the directory


def test_runner_refuses_damaged_file_before_loading(tmp_path, damaged):
    """``load_from``, ``resume=PATH`` and auto-resume, in train() and val()."""
    def runner_with(name, load_from=None, resume=False):
        loader = dict(dataset=ToyData(), batch_size=2, num_workers=0,
                      sampler=dict(type='DefaultSampler', shuffle=False),
                      collate_fn=dict(type='default_collate'))
        return Runner(
            model=ToyNet(), work_dir=str(tmp_path), experiment_name=f'{name}_{id(tmp_path)}',
            train_dataloader=loader, train_cfg=dict(by_epoch=True, max_epochs=1),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
            val_dataloader=loader, val_evaluator=dict(type=NumpyMetric), val_cfg=dict(),
            custom_hooks=[dict(type='CBNHook', burn_in_iters=0),
                          dict(type='WeightsOnlyCheckpointHook')],
            load_from=load_from, resume=resume)

    path = str(damaged['truncated'])
    with pytest.raises(CheckpointFileError, match=f'checkpoint {path} is truncated'):
        runner_with('load', load_from=path).train()
    with pytest.raises(CheckpointFileError, match=f'checkpoint {path} is truncated'):
        runner_with('resume', load_from=path, resume=True).train()
    with pytest.raises(CheckpointFileError, match='is not a PyTorch checkpoint'):
        runner_with('val', load_from=str(damaged['garbage'])).val()
    record = tmp_path / 'last_checkpoint'
    record.write_text(path)
    named = re.escape(f'(named by {record} for auto-resume)')
    with pytest.raises(CheckpointFileError, match=f'{re.escape(path)} {named} is truncated'):
        runner_with('auto', resume=True).train()
    record.write_text(str(damaged['missing']))
    with pytest.raises(FileNotFoundError, match=f'{named} does not exist'):
        runner_with('auto_missing', resume=True).train()
    record.write_text('')
    with pytest.raises(CheckpointFileError, match=f'{record} is empty'):
        runner_with('auto_empty', resume=True).train()


# ---------------------------------------------------------------- switches, in a Runner
@pytest.mark.parametrize('arg', ['encode', 'restore_rng', 'atomic_save', 'check_files'])
def test_switch_changes_only_its_part_in_a_runner(tmp_path, monkeypatch, arg, damaged):
    """One epoch with one part off: that part is off, the other parts still work."""
    from mmengine.fileio.backends.local_backend import LocalBackend
    put, written = LocalBackend.put, []

    def recording_put(self, obj, filepath):
        written.append(os.path.basename(str(filepath)))
        return put(self, obj, filepath)

    monkeypatch.setattr(LocalBackend, 'put', recording_put)
    make_noisy_runner(tmp_path / 'run', f'switch_{arg}_{id(tmp_path)}', 1,
                      **{arg: False}).train()
    path = tmp_path / 'run' / 'epoch_1.pth'
    if arg == 'encode':
        if WEIGHTS_ONLY_DEFAULT:
            with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
                torch.load(path)
        loaded = torch.load(path, weights_only=False)
        assert type(loaded['message_hub']['log_scalars']['train/loss']) is HistoryBuffer
    else:
        loaded = torch.load(path)  # weights_only
        assert loaded['meta']['weights_only_format'] == ckpt.FORMAT
    assert ('rng_state' in loaded) is (arg != 'restore_rng')
    atomic = [n for n in written if n.startswith('epoch_1.pth')]
    assert atomic == (['epoch_1.pth'] if arg == 'atomic_save' else
                      [f'epoch_1.pth.partial-{os.getpid()}'])
    # A truncated file to resume from: refused by name before loading, unless unchecked.
    truncated = str(damaged['truncated'])
    runner = make_noisy_runner(tmp_path / 'again', f'again_{arg}_{id(tmp_path)}', 2, **{
        arg: False}, resume_from=truncated)
    if arg == 'check_files':
        with pytest.raises(Exception) as err:
            runner.train()
        assert not isinstance(err.value, CheckpointFileError)
    else:
        with pytest.raises(CheckpointFileError, match=f'{re.escape(truncated)} is truncated'):
            runner.train()


# ---------------------------------------------------------------- per-rank state, one process
def resuming_runner(model, tmp_path):
    """A Runner of ``model`` built to resume (what ``after_load_checkpoint`` is told)."""
    return Runner(model=model, work_dir=str(tmp_path), resume=True,
                  experiment_name=f'resuming_{id(model)}')


def at_progress(model, epoch: int, iter: int):
    """What ``before_train`` reads of a Runner resumed at ``epoch``/``iter`` (no data, no
    other hook, an epoch-based loop)."""
    return types.SimpleNamespace(model=model, epoch=epoch, iter=iter, hooks=[],
                                 train_dataloader=[], train_loop=None)


def cbn_state(steps=3, seed=0):
    """A bound ToyNet trained ``steps`` SGD steps, and its state_dict."""
    torch.manual_seed(seed)
    net = ToyNet()
    cbn_plugin.bind(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        loss = net(torch.randn(2, 1, 6, 6), torch.randn(2, 1), mode='loss')['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
        cbn_plugin.step(net)
    return net, {k: v.clone() for k, v in net.state_dict().items()}


HOOK_MODULES = (atomic_hook, concern, rank_state_hook, rng_hook)


def warnings_of(monkeypatch) -> list[str]:
    """What the checkpoint hooks log from now on."""
    said = []
    for module in HOOK_MODULES:
        monkeypatch.setattr(module, 'print_log', lambda msg, *a, **k: said.append(str(msg)))
    return said


def as_rank(monkeypatch, rank: int, world: int) -> None:
    """Make the checkpoint hooks see this process as ``rank`` of ``world``."""
    for module in (rank_state_hook, rng_hook):
        monkeypatch.setattr(module, 'get_world_size', lambda: world)
        monkeypatch.setattr(module, 'get_rank', lambda: rank)


@pytest.mark.parametrize('saved_world, now_world, rank_states', [
    (2, 1, True),    # fewer processes
    (1, 2, True),    # more processes (a single-process checkpoint)
    (2, 2, False),   # same world, written without per-rank state
    (2, 2, None),    # same world, written before per-rank state existed
])
def test_other_world_size_empties_windows_and_says_so(monkeypatch, tmp_path, saved_world,
                                                      now_world, rank_states):
    net, state = cbn_state()
    assert int(state['bn.window_filled'][0]) == 1 and state['bn.window_mean'].abs().sum() > 0
    checkpoint = {'meta': {'epoch': 1, 'iter': 3, 'seed': 5}, 'state_dict': dict(state),
                  'rng_state': dict(ckpt.get_rng_state(), world_size=saved_world)}
    if saved_world > 1 and rank_states is not None:
        checkpoint['rank_states'] = {'format': 1, 'world_size': saved_world,
                                     'buffers': rank_states,
                                     'ranks': [{'rng_state': checkpoint['rng_state']}] * 2}
    as_rank(monkeypatch, now_world - 1, now_world)
    said = warnings_of(monkeypatch)
    hook = WeightsOnlyCheckpointHook()
    hook.after_load_checkpoint(resuming_runner(net, tmp_path), checkpoint)
    loaded = checkpoint['state_dict']
    assert int(loaded['bn.num_steps']) == 3  # the clock goes on
    assert int(loaded['bn.window_filled'][0]) == 0 and int(loaded['bn.window_next'][0]) == 0
    assert loaded['bn.window_mean'].abs().sum() == 0
    for key in ('conv.weight', 'bn.running_mean', 'bn.running_var', 'head.weight'):
        assert torch.equal(loaded[key], state[key]), key  # the model itself is restored
    (warning,) = [s for s in said if 'restart empty' in s]
    assert 'windows of 1 CBN layers restart empty' in warning
    if saved_world != now_world:
        assert f'written by {saved_world} processes and this run has {now_world}' in warning
    else:
        assert f'{saved_world}-process run' in warning
    torch.rand(5)  # moves the generator on from the saved state
    hook.before_train(at_progress(net, epoch=1, iter=3))
    restored = torch.equal(torch.get_rng_state(), checkpoint['rng_state']['torch'])
    if rank_states is False:  # each rank's own RNG state is there: restored
        assert restored and 'restored the RNG states' in said[-1]
    else:  # some other rank's, or another layout's: not restored, and said so
        assert not restored
        assert 'RNG states not restored: the checkpoint ' in said[-1]
    net.load_state_dict(loaded)  # loads (shapes from the checkpoint)
    assert int(net.bn.window_filled[0]) == 0


def test_rank_restores_its_own_buffers(monkeypatch, tmp_path):
    """Rank 1 of 2 gets rank 1's buffers and RNG state from the rank states, not rank 0's."""
    net0, state0 = cbn_state(seed=0)
    net1, state1 = cbn_state(seed=1)
    assert not torch.equal(state0['bn.window_mean'], state1['bn.window_mean'])
    rng1 = dict(ckpt.get_rng_state(), world_size=2)
    params = {name for name, _ in net1.named_parameters()}
    buffers1 = {k: v for k, v in state1.items() if k.startswith('bn.') and k not in params}
    checkpoint = {'meta': {'epoch': 1, 'iter': 3}, 'state_dict': dict(state0),
                  'rng_state': {'format': 1, 'world_size': 2},
                  'rank_states': {'format': 1, 'world_size': 2, 'buffers': True,
                                  'ranks': [{'rng_state': 'rank 0'},
                                            {'rng_state': rng1, 'buffers': buffers1}]}}
    as_rank(monkeypatch, 1, 2)
    said = warnings_of(monkeypatch)
    hook = WeightsOnlyCheckpointHook()
    runner = resuming_runner(net1, tmp_path)
    hook.after_load_checkpoint(runner, checkpoint)
    loaded = checkpoint['state_dict']
    for key, value in state1.items():
        want = value if key in buffers1 else state0[key]  # parameters: the model's
        assert torch.equal(loaded[key], want), key
    assert not said
    torch.rand(5)  # moves the generator on from the saved state
    hook.before_train(at_progress(net1, epoch=1, iter=3))
    assert torch.equal(torch.get_rng_state(), rng1['torch'])  # rank 1's, not 'rank 0'
    assert 'restored the RNG states' in said[-1] and '(rank 1 of 2)' in said[-1]
    assert ckpt.rank_local_buffers(net1).keys() == buffers1.keys()
    with pytest.raises(ValueError, match="checkpoint\\['rank_states'\\] has format 7"):
        hook.after_load_checkpoint(runner, dict(checkpoint, rank_states={'format': 7}))


def test_unseeded_runner_resume_warns_about_the_sampler_seed(tmp_path, monkeypatch):
    """A Runner built without tools/train.py and without a seed: the resume says what differs."""
    def runner(name, resume_from=None, max_epochs=1):
        return tiny_runner(tmp_path / name, max_epochs=max_epochs, resume_from=resume_from,
                           hooks=[dict(type='CBNHook', burn_in_iters=1),
                                  dict(type='WeightsOnlyCheckpointHook')])

    first = runner('first')
    first.train()
    said = warnings_of(monkeypatch)
    again = runner('again', resume_from=str(tmp_path / 'first' / 'epoch_1.pth'), max_epochs=2)
    again.train()
    warning = [s for s in said if 'train sampler shuffles' in s]
    assert warning and f'run seeded with {first.seed}' in warning[0], said
    assert f'randomness.seed={first.seed}' in warning[0]


# ---------------------------------------------------------------- the hooks one by one
def test_checkpoint_hooks_registered_with_their_priorities():
    from mmengine.runner import get_priority
    classes = {cls.__name__: cls for cls in ckpt.CHECKPOINT_HOOKS}
    assert set(classes) == {*SPLIT, 'WeightsOnlyCheckpointHook'}
    for name, cls in classes.items():
        assert HOOKS.get(name) is cls, name
    # The RNG and rank-state hooks add their parts before the codec encodes.
    assert get_priority(ckpt.ResumeRNGHook.priority) < get_priority(
        ckpt.CheckpointCodecHook.priority)
    assert get_priority(ckpt.RankStateHook.priority) < get_priority(
        ckpt.CheckpointCodecHook.priority)
    assert [type(p).__name__ for p in WeightsOnlyCheckpointHook().parts] == list(SPLIT)
    with pytest.raises(ValueError, match="CheckpointCodecHook encode must be True or False, "
                                         "got 'yes'"):
        ckpt.CheckpointCodecHook(encode='yes')
    with pytest.raises(ValueError, match='RankStateHook save_buffers must be True or False, '
                                         'got 1'):
        ckpt.RankStateHook(save_buffers=1)


def test_add_checkpoint_hooks_lists_one_hook_per_concern():
    cfg = ConfigDict(custom_hooks=[dict(type='CBNHook', burn_in_iters=1)])
    assert ckpt.add_checkpoint_hooks(cfg) == list(SPLIT)
    assert [h['type'] for h in cfg.custom_hooks] == ['CBNHook', *SPLIT]
    assert ckpt.add_checkpoint_hooks(cfg) == []  # listed already
    assert len(cfg.custom_hooks) == 6
    off = ConfigDict(check_checkpoint_files=False, atomic_checkpoints=False,
                     resume_rng_state=False, resume_rank_states=False,
                     weights_only_checkpoints=False)
    assert ckpt.add_checkpoint_hooks(off) == ['RankStateHook', 'CheckpointCodecHook']
    assert off.custom_hooks == [dict(type='RankStateHook', save_buffers=False),
                                dict(type='CheckpointCodecHook', encode=False)]
    bundle = ConfigDict(custom_hooks=[dict(type='WeightsOnlyCheckpointHook')])
    assert ckpt.add_checkpoint_hooks(bundle) == []  # the bundle handles every concern
    some = ConfigDict(custom_hooks=[dict(type='ResumeRNGHook')])
    assert ckpt.add_checkpoint_hooks(some) == [n for n in SPLIT if n != 'ResumeRNGHook']
    with pytest.raises(ValueError, match='config resume_rng_state=False contradicts the '
                                         r'ResumeRNGHook in custom_hooks \(listed\)'):
        ckpt.add_checkpoint_hooks(ConfigDict(resume_rng_state=False,
                                             custom_hooks=[dict(type='ResumeRNGHook')]))
    with pytest.raises(ValueError, match='config weights_only_checkpoints=True contradicts '
                                         r'the CheckpointCodecHook .*\(encode=False\)'):
        ckpt.add_checkpoint_hooks(ConfigDict(weights_only_checkpoints=True, custom_hooks=[
            dict(type='CheckpointCodecHook', encode=False)]))
    with pytest.raises(ValueError, match="config atomic_checkpoints='no': must be True or "
                                         'False'):
        ckpt.add_checkpoint_hooks(ConfigDict(atomic_checkpoints='no'))


@needs_weights_only_default
def test_codec_hook_alone_writes_weights_only_files_and_decodes_them(tmp_path):
    codec = split_hooks('CheckpointCodecHook')
    runner, _ = make_runner(tmp_path / 'on', f'codec_{id(tmp_path)}', max_epochs=1,
                            ckpt_hooks=codec)
    runner.train()
    path = tmp_path / 'on' / 'epoch_1.pth'
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    loaded = torch.load(path)  # weights_only
    assert loaded['meta']['weights_only_format'] == ckpt.FORMAT
    assert 'rng_state' not in loaded  # the codec alone adds nothing
    again, record = make_runner(tmp_path / 'again', f'codec_again_{id(tmp_path)}',
                                resume_from=str(path), ckpt_hooks=split_hooks(
                                    'CheckpointCodecHook'))
    again.train()
    scalars = record.resumed['message_hub']['log_scalars']
    assert scalars and all(type(b) is HistoryBuffer for b in scalars.values())
    # The control: encode=False writes what torch refuses by default.
    off, _ = make_runner(tmp_path / 'off', f'codec_off_{id(tmp_path)}', max_epochs=1,
                         ckpt_hooks=split_hooks('CheckpointCodecHook', CheckpointCodecHook=dict(
                             encode=False)))
    off.train()
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        torch.load(tmp_path / 'off' / 'epoch_1.pth')


@pytest.mark.parametrize('listed', [1, 2, 0])
def test_atomic_hook_alone_keeps_the_previous_file(tmp_path, monkeypatch, listed):
    """The rewrite of the newest checkpoint fails halfway: with ``AtomicCheckpointHook``
    (listed once or twice: one partial file per save) the first version is intact; without
    it (the control) the file ``last_checkpoint`` names is truncated."""
    seen = failing_put(monkeypatch, 'epoch_1.pth', nth=2)
    said = warnings_of(monkeypatch)
    runner, _ = make_runner(tmp_path, f'atomic_alone{listed}_{id(tmp_path)}', max_epochs=1,
                            ckpt_hooks=split_hooks(*['AtomicCheckpointHook'] * listed,
                                                   'CheckpointCodecHook'))
    with pytest.raises(OSError, match='simulated'):
        runner.train()
    path = tmp_path / 'epoch_1.pth'
    assert len(seen) == 2 and (tmp_path / 'last_checkpoint').read_text() == str(path)
    if not listed:
        with pytest.raises(CheckpointFileError, match='truncated'):
            ckpt.check_checkpoint_file(path)
        return
    assert seen == [str(tmp_path / f'epoch_1.pth.partial-{os.getpid()}')] * 2
    ckpt.check_checkpoint_file(path)
    assert 'best_score' not in ckpt.load_checkpoint(path)['message_hub']['runtime_info']
    twice = [s for s in said if s.startswith('AtomicCheckpointHook: AtomicCheckpointHook '
                                             'comes before it')]
    assert len(twice) == listed - 1, said


def test_atomic_hook_warns_about_a_single_kept_checkpoint(tmp_path, monkeypatch):
    said = warnings_of(monkeypatch)
    tiny_runner(tmp_path / 'one', max_epochs=1, checkpoint=dict(max_keep_ckpts=1),
                hooks=[dict(type='CBNHook', burn_in_iters=1),
                       *split_hooks('AtomicCheckpointHook', 'CheckpointCodecHook')]).train()
    assert any(s.startswith('AtomicCheckpointHook: CheckpointHook max_keep_ckpts=1')
               for s in said), said
    said.clear()
    tiny_runner(tmp_path / 'two', max_epochs=1, checkpoint=dict(max_keep_ckpts=2),
                hooks=[dict(type='CBNHook', burn_in_iters=1),
                       *split_hooks('AtomicCheckpointHook', 'CheckpointCodecHook')]).train()
    assert not any('max_keep_ckpts' in s for s in said), said


@pytest.mark.parametrize('listed', [True, False])
def test_file_check_hook_alone_refuses_a_damaged_file(tmp_path, damaged, listed):
    truncated = str(damaged['truncated'])
    names = ('CheckpointFileCheckHook', 'CheckpointCodecHook') if listed else (
        'CheckpointCodecHook', )
    runner = tiny_runner(tmp_path, max_epochs=1, resume_from=truncated,
                         hooks=[dict(type='CBNHook', burn_in_iters=1), *split_hooks(*names)])
    if listed:
        with pytest.raises(CheckpointFileError, match=f'{re.escape(truncated)} is truncated'):
            runner.train()
    else:  # the control: MMEngine reads it and fails somewhere inside torch.load
        with pytest.raises(Exception) as err:
            runner.train()
        assert not isinstance(err.value, CheckpointFileError)


@pytest.mark.parametrize('kit', ['split', 'bundle', 'no_buffers'])
def test_rank_state_hook_saves_and_restores_each_ranks_buffers(tmp_path, monkeypatch, kit):
    """Two ranks in one process: ``gather_to_writer`` returns rank 1's state beside rank
    0's. The file holds rank 1's CBN buffers and RNG states by rank; resumed as rank 1
    its own buffers go into the ``state_dict`` and its RNG states are restored. With
    ``save_buffers=False`` (the control) no buffers are stored and the windows restart
    empty."""
    net0, state0 = cbn_state(seed=0)
    net1, state1 = cbn_state(seed=1)
    torch.manual_seed(11)
    rank1 = {'rng_state': dict(ckpt.get_rng_state(), world_size=2),
             'buffers': ckpt.rank_local_buffers(net1), 'sync_shifts': {}}
    monkeypatch.setattr(concern, 'gather_to_writer',
                        lambda local: [local, {k: rank1[k] for k in local}])
    as_rank(monkeypatch, 0, 2)
    hooks = {'split': split_hooks(), 'bundle': [dict(type='WeightsOnlyCheckpointHook')],
             'no_buffers': split_hooks(RankStateHook=dict(save_buffers=False))}[kit]
    runner = tiny_runner(tmp_path / 'w', net0, hooks=hooks, max_epochs=1)
    runner.call_hook('before_run')
    runner.save_checkpoint(str(tmp_path), 'ranks.pth', save_optimizer=False,
                           save_param_scheduler=False)
    runner.call_hook('after_run')
    assert 'save_checkpoint' not in runner.__dict__  # every wrap undone
    checkpoint = torch.load(tmp_path / 'ranks.pth')  # weights_only
    saved = checkpoint['rank_states']
    assert (saved['format'], saved['world_size']) == (1, 2)
    assert same(saved['ranks'][1]['rng_state'], rank1['rng_state'])
    assert 'buffers' not in saved['ranks'][0]  # rank 0's are the state_dict's
    assert saved['buffers'] is (kit != 'no_buffers')
    if kit != 'no_buffers':
        assert same(dict(saved['ranks'][1]['buffers']), rank1['buffers'])

    # Resumed as rank 1 at the checkpoint's progress.
    checkpoint['meta'].update(epoch=1, iter=3)
    as_rank(monkeypatch, 1, 2)
    said = warnings_of(monkeypatch)
    loading = [HOOKS.build(dict(h)) for h in hooks]
    resuming = resuming_runner(net1, tmp_path)
    for hook in sorted(loading, key=lambda h: 0 if isinstance(h, WeightsOnlyCheckpointHook)
                       else ckpt.CHECKPOINT_HOOKS.index(type(h))):
        hook.after_load_checkpoint(resuming, checkpoint)
    loaded = checkpoint['state_dict']
    if kit == 'no_buffers':
        assert int(loaded['bn.window_filled'][0]) == 0 and loaded['bn.window_mean'].abs().sum() == 0
        assert any('windows of 1 CBN layers restart empty' in s for s in said), said
    else:
        for key, value in state1.items():
            want = value if key in rank1['buffers'] else state0[key]
            assert torch.equal(loaded[key], want), key
        assert not said
    torch.rand(5)  # moves the generator on from the saved state
    for hook in loading:
        hook.before_train(at_progress(net1, epoch=1, iter=3))
    assert torch.equal(torch.get_rng_state(), rank1['rng_state']['torch'])
    assert 'ResumeRNGHook: restored the RNG states' in said[-1] and '(rank 1 of 2)' in said[-1]


def test_hooks_listed_twice_act_once(tmp_path, monkeypatch):
    """Every hook listed twice, and the bundle besides: one partial file per save, files
    equal to those of the hooks listed once, each duplicate says it does nothing, and the
    resume from them goes on exactly as from the hooks listed once."""
    from mmengine.fileio.backends.local_backend import LocalBackend
    put, written = LocalBackend.put, []

    def recording_put(self, obj, filepath):
        written.append(os.path.basename(str(filepath)))
        return put(self, obj, filepath)

    monkeypatch.setattr(LocalBackend, 'put', recording_put)
    said = warnings_of(monkeypatch)
    twice = [*split_hooks(), *split_hooks(), dict(type='WeightsOnlyCheckpointHook')]
    once = make_noisy_runner(tmp_path / 'once', f'once_{id(tmp_path)}', 2,
                             ckpt_hooks=split_hooks())
    once.train()
    written.clear()
    make_noisy_runner(tmp_path / 'twice', f'twice_{id(tmp_path)}', 2, ckpt_hooks=twice).train()
    assert written == [f'epoch_{e}.pth.partial-{os.getpid()}' for e in (1, 2)]
    for name in SPLIT:
        # before_run of every Runner.train(): the second listing and the bundle's part
        assert sum(s.startswith(f'{name}: {name} comes before it') for s in said) == 2, name
    want = torch.load(tmp_path / 'once' / 'epoch_2.pth')
    got = torch.load(tmp_path / 'twice' / 'epoch_2.pth')
    for key in ('state_dict', 'optimizer', 'rng_state'):
        assert helpers.same_tree(got[key], want[key]), key
    hubs = [ckpt.decode(c['message_hub'])['log_scalars'] for c in (got, want)]
    assert list(hubs[0]) == list(hubs[1])  # decoded once: HistoryBuffers again
    for key in ('train/loss', 'train/lr', 'val/score'):  # (not the timings)
        assert type(hubs[0][key]) is HistoryBuffer and same(hubs[0][key], hubs[1][key]), key
    resumed = {kit: final_state(make_noisy_runner(
        tmp_path / f'resumed_{kit}', f'res_{kit}_{id(tmp_path)}', 3, ckpt_hooks=hooks,
        resume_from=str(tmp_path / kit / 'epoch_2.pth')))
        for kit, hooks in (('once', split_hooks()), ('twice', twice))}
    assert all(torch.equal(resumed['twice'][k], v) for k, v in resumed['once'].items())
