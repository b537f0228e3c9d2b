#!/usr/bin/env bash
# Create .venv in the repository and install the pinned OpenMMLab stack into it.
# Idempotent: each step is skipped when its package is already importable, so a
# second run builds nothing. mmcv 2.1.0 has no wheel for torch 2.13, so it is
# built from source with its CPU ops (nms, RoIAlign); pip's wheel cache makes a
# rebuild on the same machine fast.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

have() { "$PY" - "$@" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
name, version = sys.argv[1], sys.argv[2]
sys.exit(0 if md.version(name) == version else 1)
PY
}

[ -x "$PY" ] || python3 -m venv "$VENV"

# A looser torch spec would pull a multi-GB CUDA build; 2.13.0 is the CPU wheel on disk.
have torch 2.13.0 || "${PIP[@]}" torch==2.13.0
# torch needs setuptools>=77.0.3; mmcv's setup.py needs pkg_resources, gone in 81.
have setuptools "$("$PY" -c 'import setuptools; print(setuptools.__version__)' 2>/dev/null || echo none)" \
  && "$PY" -c 'import setuptools, sys; v = tuple(map(int, setuptools.__version__.split(".")[:2])); sys.exit(0 if (77, 0) <= v < (81, 0) else 1)' \
  || "${PIP[@]}" "setuptools>=77.0.3,<81" wheel numpy ninja
"$PY" -c 'import wheel, numpy, ninja' 2>/dev/null || "${PIP[@]}" wheel numpy ninja
if ! "$PY" -c 'import mmcv.ops' 2>/dev/null; then
  echo "building mmcv 2.1.0 with CPU ops (about 12 minutes on 2 cores, once)" >&2
  # No build isolation: an isolated build would pull a CUDA torch into the build env.
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
    "${PIP[@]}" --no-build-isolation mmcv==2.1.0
fi
have mmengine 0.10.7 || "${PIP[@]}" mmengine==0.10.7
have mmdet 3.3.0 || "${PIP[@]}" mmdet==3.3.0
"$PY" -c 'import pycocotools, pytest, sklearn' 2>/dev/null || "${PIP[@]}" pycocotools pytest scikit-learn
"$PY" -c 'import cbn_plugin' 2>/dev/null || "${PIP[@]}" --no-build-isolation --no-deps -e .
