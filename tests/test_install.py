"""Installing the plugin into an existing environment, and the import-time version check.

- ``setup.cfg`` states ranges, the same as ``cbn_plugin.versions.SUPPORTED``;
  the exact pins are ``constraints.txt`` (the newest stack, ``make test``) and
  ``constraints-oldest.txt`` (the oldest, ``make test-oldest``: every lower
  bound of the ranges is what it pins), which ``tools/install_env.sh`` (and
  the Makefile's stamps) use, and this environment is the one its stamp names.
- The code needs no newer Python than ``python_requires`` (``vermin``, static:
  only one Python runs here).
- pip, resolving the plugin's wheel offline (``--dry-run --no-index``) against
  this environment and against a stand-in for a CUDA user's OpenMMLab
  environment (torch 2.1.2+cu121, mmcv 2.1.0, mmengine 0.10.3, mmdet 3.2.0,
  mmsegmentation 1.1.2: metadata only), installs the plugin alone: it would
  neither replace nor add torch, mmcv, mmengine, mmdet or mmsegmentation.
  A pin that the environment does not satisfy makes the resolution fail.
- ``import cbn_plugin`` with an mmcv/mmengine/mmdet/mmseg/torch outside the
  supported ranges raises an error naming the installed version and the range.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import cbn_plugin
from cbn_plugin import versions
from cbn_plugin.versions import SUPPORTED, UnsupportedVersionError, check_versions

REPO = Path(__file__).resolve().parents[1]
STACK = ('torch', 'mmcv', 'mmengine', 'mmdet', 'mmsegmentation')


def setup_cfg_requirements() -> dict[str, list[Requirement]]:
    """``install_requires`` and each extra of ``setup.cfg``, parsed."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / 'setup.cfg')
    out = {'install_requires': cfg['options']['install_requires']}
    out.update(cfg['options.extras_require'])
    return {key: [Requirement(line) for line in value.strip().splitlines() if line.strip()]
            for key, value in out.items()}


NEWEST, OLDEST = 'constraints.txt', 'constraints-oldest.txt'


def constraints(name: str = NEWEST) -> dict[str, str]:
    """``{canonical name: pinned version}`` of a pin file (``constraints.txt`` by default)."""
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        line = re.sub(r'(^|\s)#.*', '', line).strip()
        if line:
            name, version = line.split('==')
            pins[canonicalize_name(name)] = version
    return pins


def test_setup_cfg_states_the_supported_ranges():
    reqs = setup_cfg_requirements()
    where = {canonicalize_name(r.name): (key, r) for key, rs in reqs.items() for r in rs}
    for name, sup in SUPPORTED.items():
        key, req = where[name]
        assert (key == 'install_requires') == sup.required, (name, key)
        assert req.specifier == SpecifierSet(sup.specifier), (name, str(req.specifier))
    assert where['mmdet'][0] == 'det' and where['mmsegmentation'][0] == 'seg'
    # No exact pin anywhere in the package metadata, and torch is the user's: no upper bound.
    for rs in reqs.values():
        for r in rs:
            assert not any(s.operator in ('==', '===', '~=') for s in r.specifier), str(r)
    assert all(s.operator == '>=' for s in where['torch'][1].specifier)


def test_the_stack_is_pinned_once_in_constraints_txt():
    pins = constraints()
    for name in (*STACK, 'ftfy', 'regex', 'pycocotools', 'setuptools'):
        assert name in pins, f'{name} is not pinned in constraints.txt'
    assert pins['torch'].endswith('+cpu')  # never the multi-GB CUDA wheel
    for name, sup in SUPPORTED.items():
        assert versions.in_range(pins[name], sup.specifier), (name, pins[name])
    install_env = (REPO / 'tools' / 'install_env.sh').read_text()
    assert 'CONSTRAINTS=${CONSTRAINTS:-constraints.txt}' in install_env
    assert '-c "$CONSTRAINTS"' in install_env
    code = [line for line in install_env.splitlines() if not line.lstrip().startswith('#')]
    assert not any(re.search(r'[\w\]]==\d', line) for line in code), 'a pin in install_env.sh'
    makefile = (REPO / 'Makefile').read_text()
    assert re.search(r'^\$\(STAMP\):.*\bconstraints\.txt\b', makefile, re.M)
    assert re.search(r'^\$\(OLDEST_STAMP\):.*\bconstraints-oldest\.txt\b', makefile, re.M)
    assert 'CONSTRAINTS=constraints-oldest.txt' in makefile


def test_the_oldest_lane_pins_every_floor():
    """A lower bound nothing runs is no floor: ``constraints-oldest.txt`` pins, for each
    supported package, a release of the range's lower bound (torch ``>=2.1``: a 2.1.x)."""
    oldest, newest = constraints(OLDEST), constraints()
    assert set(oldest) >= {*STACK, 'setuptools', 'numpy'}
    for name, sup in SUPPORTED.items():
        (floor,) = [Version(s.version) for s in SpecifierSet(sup.specifier) if s.operator == '>=']
        pin = Version(oldest[name])
        assert versions.in_range(oldest[name], sup.specifier), (name, oldest[name])
        assert pin.release[:len(floor.release)] == floor.release, \
            f'{name}: the oldest lane runs {pin}, the declared floor is {floor}'
        assert pin <= Version(newest[name].split('+')[0]), name


# The environment tools/install_env.sh made (make install / test / demo touch this stamp in
# it; make test-oldest's names constraints-oldest.txt in it): there the whole stack of that
# pin file must be installed. Anywhere else (a user's own environment, README "Use it in
# your environment") only the supported ranges apply.
STAMP = Path(sys.prefix) / '.stack-installed'
PINNED_ENVIRONMENT = STAMP.is_file()


@pytest.mark.skipif(not PINNED_ENVIRONMENT, reason='not the environment tools/install_env.sh '
                    'made (no .stack-installed in sys.prefix): only the ranges are checked')
def test_this_environment_is_the_pinned_stack():
    import importlib.metadata as md
    import sysconfig
    # The environment's own site-packages only: once pkg_resources is imported (mmengine
    # does), setuptools' vendored wheel/packaging/platformdirs are on sys.path too.
    site = sorted({sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']})
    installed = {canonicalize_name(d.metadata['Name']): d.version
                 for d in md.distributions(path=site)}
    pin_file = STAMP.read_text().strip() or NEWEST
    wrong = {name: (pin, installed.get(name)) for name, pin in constraints(pin_file).items()
             if installed.get(name) != pin}
    assert not wrong, (f'{{name: ({pin_file}, installed)}}: {wrong}; '
                       'run bash tools/install_env.sh')


# ------------------------------------------------------------------ pip resolution
def pip_env() -> dict:
    """The environment without any pip configuration: no index, no find-links, no
    machine-wide constraints; only what is installed counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('PIP_')}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK='1')
    return env


def pip(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'pip', *map(str, args)], cwd=cwd, env=pip_env(),
                          capture_output=True, text=True, timeout=300)


def build_wheel(tmp: Path, setup_cfg: str | None = None) -> Path:
    """The plugin's wheel, built offline from a copy of the package (``setup_cfg``
    replaces ``setup.cfg`` when given)."""
    src = tmp / 'src'
    src.mkdir()
    for name in ('setup.cfg', 'pyproject.toml', 'README.md'):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / 'cbn_plugin', src / 'cbn_plugin',
                    ignore=shutil.ignore_patterns('__pycache__'))
    if setup_cfg is not None:
        (src / 'setup.cfg').write_text(setup_cfg)
    out = pip('wheel', '-q', '--no-deps', '--no-build-isolation', '--no-index', '-w', tmp / 'dist',
              './src', cwd=tmp)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp / 'dist').glob('cbn_plugin-*.whl')
    return wheel


# A CUDA user's OpenMMLab environment: what pip sees of it (distribution metadata).
USER_ENV = {'torch': '2.1.2+cu121', 'mmcv': '2.1.0', 'mmengine': '0.10.3', 'mmdet': '3.3.0',
            'mmsegmentation': '1.2.2', 'pycocotools': '2.0.7', 'ftfy': '6.1.1',
            'regex': '2023.10.3', 'packaging': '23.2'}


def fake_environment(tmp: Path, dists: dict[str, str]) -> Path:
    """A venv (no pip) whose site-packages holds only the metadata of ``dists``."""
    venv = tmp / 'user-env'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv], check=True)
    (site,) = venv.glob('lib/python*/site-packages')
    for name, version in dists.items():
        info = site / f'{name}-{version}.dist-info'
        info.mkdir()
        (info / 'METADATA').write_text(
            f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
        (info / 'INSTALLER').write_text('pip\n')
        (info / 'RECORD').write_text('')
    return venv / 'bin' / 'python'


def dry_run(tmp: Path, wheel: Path, python: Path | None = None, extras='det,seg'):
    """``pip install --dry-run --no-index --report`` of ``wheel[extras]`` into ``python``'s
    environment (this one by default): the CompletedProcess and the report."""
    report = tmp / 'report.json'
    target = ('--python', python) if python is not None else ()
    out = pip(*target, 'install', '--dry-run', '--no-index', '--report', report, '-q',
              f'{wheel}[{extras}]' if extras else wheel, cwd=tmp)
    return out, (json.loads(report.read_text()) if out.returncode == 0 else None)


def planned(report: dict) -> dict[str, str]:
    return {canonicalize_name(item['metadata']['name']): item['metadata']['version']
            for item in report['install']}


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp('wheel'))


def installed_extras() -> str:
    """The plugin's extras whose codebase this environment has (``det``, ``seg``)."""
    extras = {'det': 'mmdet', 'seg': 'mmsegmentation'}
    return ','.join(extra for extra, name in extras.items()
                    if versions.installed_version(name) is not None)


def test_pip_install_into_this_environment_keeps_its_stack(wheel, tmp_path):
    out, report = dry_run(tmp_path, wheel, extras=installed_extras())
    assert out.returncode == 0, f'pip could not resolve the plugin here:\n{out.stderr}'
    plan = planned(report)
    # (Nothing at all where this version of the plugin is installed already, not editable:
    # the oldest lane, after its user test's pip install .)
    assert set(plan) <= {'cbn-plugin'}, f'pip would also install/replace {plan}'


def test_pip_install_into_a_cuda_users_environment_keeps_its_stack(wheel, tmp_path):
    python = fake_environment(tmp_path, USER_ENV)
    out, report = dry_run(tmp_path, wheel, python)
    assert out.returncode == 0, f'pip could not resolve the plugin there:\n{out.stderr}'
    plan = planned(report)
    assert set(plan) == {'cbn-plugin'}, f'pip would also install/replace {plan}'
    # The stand-in is what pip saw: a different environment from this one.
    assert report['environment']['python_version'] == '.'.join(map(str, sys.version_info[:2]))


@pytest.mark.parametrize('bad', ['torch==1.13.1', 'mmcv==2.2.0', 'mmengine>=1.0'])
def test_a_pin_the_environment_lacks_fails_to_resolve(bad, tmp_path):
    """The check above can fail: with a requirement the installed stack does not meet,
    pip (offline) would have to replace it, and cannot. Each one lies outside the
    supported ranges, so no supported environment meets it."""
    name = bad.split('=')[0].split('>')[0]
    text = (REPO / 'setup.cfg').read_text()
    text, n = re.subn(rf'^(\s+){name}[^\n]*$', rf'\g<1>{bad}', text, count=1, flags=re.M)
    assert n == 1
    out, _ = dry_run(tmp_path, build_wheel(tmp_path, setup_cfg=text), extras=installed_extras())
    assert out.returncode != 0
    assert name in out.stderr and 'No matching distribution' in out.stderr, out.stderr


# ------------------------------------------------------------------ the Python floor
def python_floor() -> str:
    """``python_requires``'s lower bound (``>=3.10`` -> ``3.10``)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / 'setup.cfg')
    (floor,) = [s.version for s in SpecifierSet(cfg['options']['python_requires'])
                if s.operator == '>=']
    return floor


def vermin(*paths, target: str) -> subprocess.CompletedProcess:
    """vermin's verdict on ``paths`` against ``target`` (``3.10``: nothing newer needed).

    ``--eval-annotations`` and ``union-types``: annotations count as evaluated
    (``X | Y`` is 3.10's, ``list[int]`` 3.9's) even under postponed evaluation, as
    MMEngine's registries and dataclasses may evaluate them. ``--exclude long``:
    ``Tensor.long()`` is not Python 2's ``long`` builtin.
    """
    exe = Path(sys.executable).with_name('vermin')
    assert exe.is_file(), f'{exe} missing: vermin is installed by tools/install_env.sh'
    return subprocess.run([exe, '--no-tips', '--violations', '--eval-annotations',
                           '--feature', 'union-types', '--exclude', 'long', f'-t={target}-',
                           *map(str, paths)], capture_output=True, text=True, timeout=300)


def test_code_needs_no_newer_python_than_python_requires():
    """What a user imports or runs (the package, ``tools/``, the configs MMEngine executes)
    needs no Python newer than ``python_requires``: checked statically, since only one
    Python (3.11) runs on these machines."""
    floor = python_floor()
    out = vermin(REPO / 'cbn_plugin', REPO / 'tools', REPO / 'configs', target=floor)
    assert out.returncode == 0, f'needs a Python newer than {floor}:\n{out.stdout}{out.stderr}'
    assert 'Minimum required versions: ' in out.stdout
    # The declared floor is what ruff lints for, too.
    assert f'target-version = "py{floor.replace(".", "")}"' in (REPO / 'pyproject.toml').read_text()


def test_python_floor_check_fails_on_newer_syntax(tmp_path):
    """The check above can fail: code needing 3.11 (``tomllib``, ``except*``) is refused."""
    (tmp_path / 'newer.py').write_text(
        'import tomllib\ntry:\n    pass\nexcept* ValueError:\n    pass\n')
    out = vermin(tmp_path, target=python_floor())
    assert out.returncode != 0 and 'Target versions not met' in out.stdout, out.stdout


# ------------------------------------------------------------------ import-time check
def test_installed_stack_passes_and_is_what_the_check_reads():
    check_versions()
    import mmcv
    import mmengine
    import torch
    assert versions.installed_version('mmcv') == mmcv.__version__
    assert versions.installed_version('mmengine') == mmengine.__version__
    assert versions.installed_version('torch') == torch.__version__


@pytest.mark.parametrize('name, module, bad, good', [
    ('mmcv', 'mmcv', '2.2.0', '2.1.0'),
    ('mmcv', 'mmcv', '2.0.1', '2.1.0'),
    ('mmcv', 'mmcv', '1.7.2', '2.1.0'),
    ('mmengine', 'mmengine', '1.0.0', '0.10.3'),
    ('mmengine', 'mmengine', '0.10.2', '0.10.3'),
    ('mmengine', 'mmengine', '0.7.1', '0.10.7'),
    ('mmdet', 'mmdet', '2.28.2', '3.3.0'),
    ('mmdet', 'mmdet', '3.2.0', '3.3.0'),
    ('mmdet', 'mmdet', '4.0.0', '3.3.0'),
    ('mmsegmentation', 'mmseg', '0.30.0', '1.2.2'),
    ('mmsegmentation', 'mmseg', '1.1.2', '1.2.2'),
    ('torch', 'torch', '2.0.1+cu118', '2.1.2+cu121'),
    ('torch', 'torch', '1.13.1', '2.1.0'),
])
def test_unsupported_version_is_refused_by_name(monkeypatch, name, module, bad, good):
    imported = pytest.importorskip(module)
    monkeypatch.delenv(versions.SKIP_ENV, raising=False)
    monkeypatch.setattr(imported, '__version__', bad)
    with pytest.raises(UnsupportedVersionError) as err:
        check_versions()
    message = str(err.value)
    assert f'{module} {bad} is installed' in message, message
    assert f'supports {SUPPORTED[name].distributions[0]}{SUPPORTED[name].specifier}' in message
    assert f'cbn_plugin {cbn_plugin.__version__}' in message
    monkeypatch.setattr(imported, '__version__', good)
    check_versions()
    # The way out it names works.
    monkeypatch.setattr(imported, '__version__', bad)
    monkeypatch.setenv(versions.SKIP_ENV, '1')
    check_versions()


def test_not_installed_optional_codebase_is_not_checked():
    check_versions({'torch': '2.13.0', 'mmengine': '0.10.7', 'mmcv': '2.1.0', 'mmdet': None,
                    'mmsegmentation': None})
    with pytest.raises(UnsupportedVersionError, match=r'mmseg 0\.30\.0 is installed.*mmdet'
                       r'|mmdet 2\.0\.0 is installed.*mmseg 0\.30\.0'):
        check_versions({'mmdet': '2.0.0', 'mmsegmentation': '0.30.0'})


def test_import_fails_clearly_with_an_unsupported_mmcv(tmp_path):
    """The check runs on ``import cbn_plugin`` itself (a fresh interpreter)."""
    script = textwrap.dedent("""
        import mmcv
        mmcv.__version__ = '2.2.0'
        import cbn_plugin
    """)
    env = {k: v for k, v in os.environ.items() if k != versions.SKIP_ENV}
    # This checkout's package, installed or not (the oldest lane's venv has no plugin
    # until test_user_stack installs one).
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
    out = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert 'UnsupportedVersionError' in out.stderr, out.stderr[-2000:]
    assert ('mmcv 2.2.0 is installed, cbn_plugin supports mmcv'
            f"{SUPPORTED['mmcv'].specifier}") in out.stderr


# ------------------------------------------------------------------ the README quotes
README_NAMES = {'torch': 'torch', 'mmcv': 'mmcv', 'mmengine': 'mmengine', 'mmdet': 'mmdet',
                'MMDetection': 'mmdet', 'mmsegmentation': 'mmsegmentation',
                'MMSegmentation': 'mmsegmentation'}


def test_readme_quotes_the_pins_and_the_ranges():
    """Versions live in constraints*.txt (the tested stacks) and versions.py (the ranges);
    the README quotes them, and a quote that drifts fails here."""
    text = (REPO / 'README.md').read_text()
    lanes = [{name: pin.split('+')[0] for name, pin in constraints(f).items()}
             for f in (NEWEST, OLDEST)]
    quoted = re.findall(r'\b(' + '|'.join(README_NAMES) + r') (\d+\.\d+\.\d+)', text)
    assert {README_NAMES[name] for name, _ in quoted} == set(STACK)
    for name, version in quoted:
        assert version in {pins[README_NAMES[name]] for pins in lanes}, (name, version)
    # The table of the tested stacks quotes both lanes.
    said = {(README_NAMES[name], version) for name, version in quoted}
    for pins in lanes:
        for name in ('torch', 'mmcv', 'mmengine', 'mmdet'):
            assert (name, pins[name]) in said, f'README does not quote {name} {pins[name]}'
    for name, sup in SUPPORTED.items():
        assert f'`{name}{sup.specifier}`' in text, f'README lacks the range {name}{sup.specifier}'
