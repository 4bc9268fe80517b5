# One entry point: every target installs .venv first (seconds when it is up to date).
PY := .venv/bin/python

.PHONY: install test demo

install:
	@tools/install.sh

# The test suite (the exact command .ci/run calls through `make test`).
test: install
	$(PY) -m pytest -ra tests

# The main job: see README.md.
demo: install
	$(PY) tools/demo.py $(DEMO_ARGS)
