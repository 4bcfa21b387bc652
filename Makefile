# The two set-up commands of the README: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint
install: $(STAMP)

# torch is installed alone and first: `torch==2.13.0` is the CPU build (an unpinned torch is a
# multi-GB CUDA build); the project's pins then resolve against it.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) jobs/distill.py

# The house style, checked by tools: ruff's formatter and linter (config in pyproject.toml).
lint: install
	$(VENV)/bin/ruff format --check vlsi_ray jobs bench tests
	$(VENV)/bin/ruff check vlsi_ray jobs bench tests

test: lint
	$(PY) -m pytest -q
