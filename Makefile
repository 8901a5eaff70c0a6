# Two commands set everything up on a fresh machine:
#   make demo   installs the runtime and starts the demo (on an embedded tiny model unless
#               RADIOLOGY_MODEL or ARGS="--model ..." names one)
#   make test   installs the runtime and test tools and runs the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned: a bare "torch" can pull a multi-GB build where a smaller one is at hand.
TORCH ?= torch==2.13.0

.PHONY: demo test install install-dev browser

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(VENV)/bin/python
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -r requirements.txt

install-dev: install
	$(PIP) install -q -r requirements-dev.txt

# Debian's chromium for the browser tests (Playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(PY) app.py $(ARGS)

test: install-dev browser
	$(PY) -m pytest -q $(PYTEST_ARGS)
