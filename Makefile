# The README's two commands: `make demo` and `make test`. Both create .venv in
# the repository and install the pinned stack on first use; later runs reuse it.
PY := .venv/bin/python
STAMP := .venv/.stack-installed

.PHONY: demo test install clean-venv

$(STAMP): tools/install_env.sh setup.cfg pyproject.toml
	bash tools/install_env.sh
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) tools/demo.py

clean-venv:
	rm -rf .venv
