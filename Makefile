# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_BUILD_OPS := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-all test-rebuild clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the pins or setup.py change.
$(STAMP): requirements-ci.txt setup.py | $(PY)
	$(PY) -m pip install --quiet -r requirements-ci.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/unidad-dist demo $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q --run-slow $(PYTEST_ARGS)

# The shipped demo teacher rebuilt as a machine without it would, then its samples' quality (~25 min on 2 cores).
test-rebuild: install
	$(PY) -m pytest -q --run-rebuild -m rebuild -s $(PYTEST_ARGS)

clean:
	rm -rf runs build .pytest_cache
