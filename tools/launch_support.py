"""What the user tools share: command-line options, config loading, the Runner, launchers.

``tools/train.py``, ``tools/test.py`` and ``tools/precise_cbn.py`` are
MMDetection's scripts plus this module (tool support, not part of the
installed ``cbn_plugin`` package): :func:`load_config` registers
MMDetection's modules and applies ``--cfg-options``/``--work-dir``/
``--launcher``; :func:`build_runner` adds the checkpoint hooks
(:func:`cbn_plugin.engine.add_checkpoint_hooks`), adopts a resumed
checkpoint's seed (:func:`cbn_plugin.engine.adopt_checkpoint_seed`) and,
without a GPU, starts the distributed run MMEngine 0.10.7 cannot start on CPU
(:func:`setup_cpu_distributed`: gloo, ``device_ids=None``; why:
``docs/checkpoints.md``, Distributed runs without a GPU);
:func:`finish_distributed` ends a process of a finished distributed run
without the interpreter's shutdown, where gloo's threads can abort it.
"""
from __future__ import annotations

import atexit
import datetime
import os
import os.path as osp
import subprocess
import sys

import torch.distributed as torch_dist
import torch.multiprocessing as mp
from mmengine.config import Config, DictAction
from mmengine.device import get_device
from mmengine.registry import MODEL_WRAPPERS, RUNNERS
from mmengine.runner import Runner
from torch.nn.parallel import DistributedDataParallel

from cbn_plugin.engine import add_checkpoint_hooks, adopt_checkpoint_seed


def add_cfg_options_and_launcher(parser):
    """``--cfg-options`` and ``--launcher``, as in MMDetection's tools."""
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')


def parse_with_local_rank(parser):
    """Add ``--local_rank``, parse the command line, export ``LOCAL_RANK`` if unset."""
    # torch.distributed.run passes --local-rank (torch >= 2.0) or sets LOCAL_RANK.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def launcher_env(launcher: str, port=None) -> dict:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` of this process.

    ``'pytorch'``: torchrun's variables as they are. ``'slurm'``: from
    ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the first host of
    ``SLURM_NODELIST`` (``scontrol show hostname``), the translation MMEngine's
    ``_init_dist_slurm`` does; ``MASTER_ADDR``/``MASTER_PORT`` already in the
    environment win, the port defaults to ``port`` or 29500. ``'mpi'``: Open
    MPI's ``OMPI_COMM_WORLD_*`` (``MASTER_ADDR`` must be set), as MMEngine's
    ``_init_dist_mpi``.
    """
    env = os.environ
    if launcher == 'pytorch':
        keys = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
        missing = [k for k in keys if k not in env]
        if missing:
            raise RuntimeError(f'--launcher pytorch needs {missing} in the environment: start '
                               'it with torchrun (tools/dist_train.sh)')
        return {k: env[k] for k in keys}
    if launcher == 'slurm':
        out = dict(RANK=env['SLURM_PROCID'], WORLD_SIZE=env['SLURM_NTASKS'],
                   LOCAL_RANK=env.get('SLURM_LOCALID', '0'))
        if 'MASTER_ADDR' in env:
            out['MASTER_ADDR'] = env['MASTER_ADDR']
        else:
            out['MASTER_ADDR'] = subprocess.getoutput(
                f"scontrol show hostname {env['SLURM_NODELIST']} | head -n1").strip()
        out['MASTER_PORT'] = str(port) if port is not None else env.get('MASTER_PORT', '29500')
        return out
    if launcher == 'mpi':
        if 'MASTER_ADDR' not in env:
            raise KeyError('The environment variable MASTER_ADDR is not set')
        return dict(RANK=env['OMPI_COMM_WORLD_RANK'], WORLD_SIZE=env['OMPI_COMM_WORLD_SIZE'],
                    LOCAL_RANK=env['OMPI_COMM_WORLD_LOCAL_RANK'], MASTER_ADDR=env['MASTER_ADDR'],
                    MASTER_PORT=env.get('MASTER_PORT', '29500'))
    raise ValueError(f'Invalid launcher type: {launcher}')


def setup_cpu_distributed(cfg) -> bool:
    """Start a CPU (gloo) distributed run that MMEngine 0.10.7 cannot start (module doc).

    Does nothing (returns ``False``) for ``launcher='none'``, when MMEngine's
    device is not ``'cpu'`` (MMEngine then initialises as usual) or when a
    process group already exists. Otherwise initialises the default process
    group from the launcher's environment, records the backend in
    ``cfg.env_cfg.dist_cfg``, makes the Runner's DDP wrapper CPU-ready
    (``device_ids=None``) and returns ``True``.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or get_device() != 'cpu' or torch_dist.is_initialized():
        return False
    env_cfg = cfg.get('env_cfg', None) or {}
    dist_cfg = dict(env_cfg.get('dist_cfg', None) or {})
    backend = dist_cfg.pop('backend', 'gloo')
    if backend == 'nccl':  # GPU only; gloo is torch's CPU backend
        backend = 'gloo'
    if dist_cfg.pop('init_backend', 'torch') != 'torch':
        raise ValueError('distributed CPU runs support only dist_cfg.init_backend="torch"')
    port = dist_cfg.pop('port', None)
    timeout = dist_cfg.pop('timeout', None)
    if timeout is not None:
        dist_cfg['timeout'] = datetime.timedelta(seconds=timeout)
    env = launcher_env(launcher, port)
    os.environ.update(env)
    if mp.get_start_method(allow_none=True) is None:  # as mmengine's init_dist
        mp.set_start_method('spawn')
    torch_dist.init_process_group(backend=backend, rank=int(env['RANK']),
                                  world_size=int(env['WORLD_SIZE']), **dist_cfg)
    cfg.merge_from_dict({'env_cfg.dist_cfg.backend': backend})

    # Runner.wrap_model would pass device_ids=[LOCAL_RANK]: a GPU index.
    wrapper = cfg.get('model_wrapper_cfg', None)
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    else:
        kind = wrapper.get('type', 'MMDistributedDataParallel')
        kind = MODEL_WRAPPERS.get(kind) if isinstance(kind, str) else kind
        if isinstance(kind, type) and issubclass(kind, DistributedDataParallel):
            wrapper.setdefault('device_ids', None)
    return True


def load_config(args):
    """Register mmdet's modules and load ``args.config``.

    ``args.launcher``, ``args.cfg_options`` and ``args.work_dir`` applied;
    the default scope is the config's, ``'mmdet'`` when it has none.
    """
    from mmdet.utils import register_all_modules, setup_cache_size_limit_of_dynamo

    # Register mmdet's modules; the scope itself comes from the config.
    register_all_modules(init_default_scope=False)
    # Reduce the number of repeated compilations and improve training (testing) speed.
    setup_cache_size_limit_of_dynamo()

    # load config
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if cfg.get('default_scope', None) is None:
        cfg.default_scope = 'mmdet'

    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        # update configs according to CLI args if args.work_dir is not None
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        # use config filename as default work_dir if cfg.work_dir is None
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg, runners=RUNNERS):
    """The Runner of ``cfg`` (``tools/test.py`` passes mmdet's ``RUNNERS``).

    First the checkpoint hooks are added, one per concern, as the config's
    switches say (:func:`cbn_plugin.engine.add_checkpoint_hooks`: files
    checked before loading, atomic writes, every rank's CBN windows and RNG
    states, checkpoints loadable with ``torch.load``'s default
    ``weights_only=True`` and decoded on load), a resumed run
    adopts its checkpoint's seed when the config sets none
    (``adopt_checkpoint_seed``) and a distributed run on CPU is set up
    (:func:`setup_cpu_distributed`).
    """
    # one hook per checkpoint concern (those the config lists are kept as listed)
    add_checkpoint_hooks(cfg)
    # a resumed run without a configured seed continues with its run's seed
    if cfg.get('resume_rng_state', True):
        adopt_checkpoint_seed(cfg)

    # distributed on CPU (gloo): what MMEngine's launcher setup cannot do
    setup_cpu_distributed(cfg)

    # build the runner from config
    if 'runner_type' not in cfg:
        # build the default runner
        return Runner.from_cfg(cfg)
    # build customized runner from the registry
    # if 'runner_type' is set in the cfg
    return runners.build(cfg)


def finish_distributed() -> None:
    """End this process of a distributed run that finished; nothing without a process group.

    Call it after ``runner.train()``/``runner.test()`` returned: in a
    distributed run it does not return. A barrier first, so no rank leaves
    while a collective is still in flight on another; then the process group
    is destroyed, the ``atexit`` handlers run (logging, multiprocessing), the
    output is flushed, and the process exits with status 0 *without* the
    interpreter's finalization.

    Why not a plain return: the gloo backend's worker threads release each
    finished collective's tensors after the caller has been woken, and when
    Python dropped such a tensor first, releasing it takes the GIL. Once the
    interpreter is finalizing, a thread that asks for the GIL is ended
    (``PyThread_exit_thread``) inside C++ frames that cannot be unwound, and
    the process aborts: ``terminate called without an active exception``,
    SIGABRT, after all its work is done, so the launcher marks the run failed
    and kills the other ranks. ``destroy_process_group`` does not end those
    threads while DDP still holds the backend (the model wrapper does, to the
    end of the process; torch 2.13), so the finalization is skipped instead:
    nothing runs after the ``atexit`` handlers that could meet a worker
    thread. (Not called after an exception: another rank may be waiting in a
    collective that never comes, and the launcher ends the run anyway.)
    """
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
