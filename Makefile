# The README's two commands: `make demo` (the main job) and `make test`.
# Both create .venv in the repository root when it is missing and install everything into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)
export DS_BUILD_OPS := 0
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS ?= 1

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch first, so no dependency pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*; touch $@

demo: venv
	$(BIN)/trime demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow and not slurm" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
