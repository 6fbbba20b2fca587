# The two commands of the README. Both are idempotent: the environment is built once and reused.
# They install exactly what requirements.lock lists (refresh it with scripts/lock.sh), never the newest releases.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $$(grep -E '^(pip|setuptools)==' requirements.lock)
	$(PY) -m pip install --quiet torch==2.13.0   # first: the CPU build; an unpinned torch pulls CUDA wheels
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

.PHONY: install train test lint
install: $(VENV)/.installed

train: install
	$(VENV)/bin/rollflow train

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks reference scripts
