#!/usr/bin/env bash
# Create .venv in the repository and install the pinned OpenMMLab stack into it.
# Every version comes from constraints.txt (the one place the stack is pinned;
# setup.cfg only states the ranges the code needs). The oldest supported stack, the
# second test lane (make test-oldest), is the same script with another venv, pin file and
# no editable plugin (its end-to-end test installs the plugin as a user does, pip install .):
#   VENV=.venv-oldest CONSTRAINTS=constraints-oldest.txt EDITABLE=0 bash tools/install_env.sh
# Idempotent: satisfied pins are not reinstalled and mmcv is built only when
# `import mmcv.ops` fails, so a second run builds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}
EDITABLE=${EDITABLE:-1}
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS")

[ -x "$PY" ] || python3 -m venv "$VENV"

# The torch pin (constraints.txt) is the CPU wheel on disk; a looser spec pulls a
# multi-GB CUDA build. torch needs setuptools>=77.0.3; mmcv's setup.py needs
# pkg_resources, gone in setuptools 81.
"${PIP[@]}" torch setuptools wheel numpy ninja mmengine
if ! "$PY" -c 'import mmcv.ops' 2>/dev/null; then
  echo "install_env: building mmcv 2.1.0 with CPU ops (about 12 minutes on 2 cores, once;" \
       "pip's wheel cache makes a rebuild fast)" >&2
  # No build isolation: an isolated build would pull a CUDA torch into it.
  # pip's wheel cache keys a built wheel by the sdist alone, not by the torch its ops were
  # compiled against: the other lane's mmcv wheel would be reused, and `import mmcv.ops`
  # fail with an undefined symbol. One wheel cache per torch version for this build.
  TORCH=$("$PY" -c 'import torch; print(torch.__version__)')
  MMCV_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/cbn-plugin/pip-mmcv-torch-$TORCH"
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
    "${PIP[@]}" --no-build-isolation --cache-dir "$MMCV_CACHE" mmcv
fi
# The two codebases the plugin is tested with. mmseg imports ftfy and regex
# without declaring them. vermin: the test of the Python floor.
"${PIP[@]}" mmdet pycocotools mmsegmentation ftfy regex pytest scikit-learn vermin
if [ "$EDITABLE" = 1 ]; then
  "${PIP[@]}" --no-build-isolation --no-deps -e .
fi
"$PY" -c 'import torch, mmcv.ops, mmdet, mmseg, cbn_plugin; print("install_env: torch",
torch.__version__, "mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmseg",
mmseg.__version__, "cbn_plugin", cbn_plugin.__version__)'
