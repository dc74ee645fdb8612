# The README's two commands: `make demo` (the main job) and `make test`.
# Both create .venv in the repository root when it is missing and install everything into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `make venv GPU=1` (a CUDA machine): PyPI's CUDA build of torch (or TORCH_INDEX's, e.g.
# https://download.pytorch.org/whl/cu128) and faiss-gpu-cu12 instead of faiss-cpu. Default: the CPU build.
GPU ?= 0
TORCH_INDEX ?=
ifeq ($(GPU),1)
TORCH_INSTALL := torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple)
FAISS := faiss-gpu-cu12
else
TORCH_INSTALL := torch==2.13.0
FAISS := faiss-cpu>=1.7.4
endif
STAMP := $(VENV)/.installed-$(GPU)-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)
export DS_BUILD_OPS := 0
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS ?= 1

.PHONY: demo test test-fast venv clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first (the CPU build unless GPU=1), so no dependency pulls another build.
	$(BIN)/python -m pip install -q $(TORCH_INSTALL)
	$(BIN)/python -m pip install -q -r <(grep -v '^faiss-cpu' requirements.txt) '$(FAISS)'
	$(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*; touch $@

demo: venv
	$(BIN)/trime demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow and not slurm and not two_hosts" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
