# The two commands of the README. Both are idempotent: the environment is built once and reused.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0   # first: the CPU build; an unpinned torch pulls CUDA wheels
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

.PHONY: install train test
install: $(VENV)/.installed

train: install
	$(VENV)/bin/rollflow train

test: install
	$(PY) -m pytest -q
