# The README's two commands: `make demo` and `make test`. Both create .venv in
# the repository and install the pinned stack on first use; later runs reuse it.
PY := .venv/bin/python
STAMP := .venv/.stack-installed

.PHONY: demo test install clean-venv

$(STAMP): tools/install_env.sh constraints.txt setup.cfg pyproject.toml
	bash tools/install_env.sh
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The detection demo (docs/demo.md): a Faster R-CNN with CBN in every norm layer trained
# from scratch at 1 image per step on handwritten digits, beside the committed comparison.
demo: $(STAMP)
	$(PY) tools/demo.py

# The comparison the demo prints (docs/small_batch_detection.md): BN, GN, naive CBN, CBN
# (paper, defaults) at 1 image per step, BN at the large batch, gradient accumulation;
# 2 seeds, 2 processes of one torch thread (about an hour on 2 cores: 6,500 s of CPU in the
# committed runs; 54 min measured when CBN pooled k = 4). To resume an
# interrupted comparison: make demo-compare COMPARE_ARGS=--reuse
.PHONY: demo-compare
demo-compare: $(STAMP)
	$(PY) tools/analysis_tools/small_batch_detection.py $(COMPARE_ARGS)

clean-venv:
	rm -rf .venv

# The GPU check (tools/analysis_tools/gpu_check.py -> docs/gpu.md and docs/gpu.json). On the
# borrowed GPU machine there is no .venv: its python3 has torch, and the plugin's core needs
# nothing else, so nothing is carried. Through the device tool, one call, timeout_s 450:
#   set -o pipefail; PYTHONUNBUFFERED=1 make gpu-check GPU_OUT=$OUT/gpu.md 2>&1 | tee $OUT/gpu_check.log
# (where make is absent: python3 tools/analysis_tools/gpu_check.py --out $OUT/gpu.md), then
# copy gpu.md and gpu.json from the call's files into docs/.
# gpu-check-cpu: the same script on this machine's CPU at tiny sizes (the smoke run).
GPU_PY ?= python3
GPU_OUT ?= docs/gpu.md
.PHONY: gpu-check gpu-check-cpu
gpu-check:
	$(GPU_PY) tools/analysis_tools/gpu_check.py --out $(GPU_OUT) $(GPU_ARGS)

gpu-check-cpu: $(STAMP)
	$(PY) tools/analysis_tools/gpu_check.py --device cpu --smoke --out $(GPU_OUT) $(GPU_ARGS)
