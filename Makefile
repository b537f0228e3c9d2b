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

# The detection demo (docs/demo.md): CBN Faster R-CNN on handwritten digits.
demo: $(STAMP)
	$(PY) tools/demo.py

# Every demo config (BN, GN, naive CBN, CBN, CBN with sampled derivatives s=2 and s=4); rewrites docs/demo.md's table and docs/demo_compare.png.
.PHONY: demo-compare
demo-compare: $(STAMP)
	$(PY) tools/demo.py --compare

clean-venv:
	rm -rf .venv

# The small-batch detection study (docs/small_batch_detection.md): every norm layer of the
# digits Faster R-CNN at 1 image per step against BN at 8 (about 80-90 min on 2 idle cores).
.PHONY: small-batch-det
small-batch-det: $(STAMP)
	$(PY) tools/analysis_tools/small_batch_detection.py
