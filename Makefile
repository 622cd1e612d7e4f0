# One command runs the tests (`make test`), one runs the pipeline (`make repro`).
# Both create .venv on first use: torch first (the local CPU build; a GPU user passes their
# CUDA build, e.g. make test TORCH='torch==2.13.0 --index-url <your CUDA wheel index>'),
# then requirements.txt, then this package in editable mode.
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# GPT-2's BPE files for tiktoken, offline (see ../shared/README.md).
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken-cache)

.PHONY: setup test repro benchmarks clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

repro: setup
	$(BIN)/dvc repro

benchmarks: setup
	$(BIN)/python benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
