# One command runs the tests (`make test`), one runs the pipeline (`make repro`).
# Both create .venv on first use: torch first (the local CPU build; a GPU user passes their
# CUDA build, e.g. make test TORCH='torch==2.13.0 --index-url <your CUDA wheel index>'),
# then requirements.lock (every other package, exact and hashed), then this package in editable mode.
# requirements.txt holds the ranges; `make lock` resolves them into requirements.lock (README, "Libraries").
VENV ?= .venv
# Exactly requirements.txt's torch line (tests/test_requirements.py checks it); the lock leaves torch out.
TORCH ?= torch==2.13.0
PIP_TOOLS ?= pip-tools==7.6.2
# e.g. make lock LOCK_ARGS=--upgrade (newest versions within the ranges), or --upgrade-package transformers
LOCK_ARGS ?=
PYTEST_ARGS ?=
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# GPT-2's BPE files for tiktoken, offline (see ../shared/README.md).
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken-cache)

.PHONY: setup lock test test-offline-env repro benchmarks clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q --require-hashes -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# The whole suite, then the fast tests again under the variables an offline user has set: the suite owns
# its environment (tests/conftest.py, hermetic_environment), whatever the caller's.
test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-offline-env

test-offline-env: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_ENDPOINT=http://127.0.0.1:1 HF_HOME=$(abspath $(VENV))/offline-hf-home \
	  TIKTOKEN_CACHE_DIR=$(abspath $(VENV))/no-tiktoken-cache CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 \
	  $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Debian's chromium and chromedriver for tests/test_playground.py, when missing: apt-get as root (as CI
# runs), else a line saying how; without them that test skips, or fails under CI=true.
.PHONY: browser
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else echo "make browser: install Debian's chromium and chromium-driver (as root: apt-get install chromium" \
	    "chromium-driver) for the playground test"; fi; \
	fi

repro: setup
	$(BIN)/dvc repro

benchmarks: setup
	$(BIN)/python benchmarks/run_all.py

# requirements.txt's ranges -> requirements.lock: every package pinned with its hashes, resolved on CPU
# Linux for Python 3.11; pins already in the lock are kept unless a range excludes them (or LOCK_ARGS).
# torch (installed first, CPU or CUDA build; its pin is the lock's last line), pip and setuptools are left
# out. The lock is a dependency of every stage in dvc.yaml: a new lock reruns the pipeline.
lock:
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_TOOLS)
	$(BIN)/pip-compile -q --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
	  --unsafe-package torch --unsafe-package pip --unsafe-package setuptools $(LOCK_ARGS) \
	  --output-file requirements.lock requirements.txt
	echo "# make installs torch first, by requirements.txt's exact pin: $(TORCH)" >> requirements.lock

clean-venv:
	rm -rf $(VENV)
