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
