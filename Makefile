# Two entry points on a fresh machine:
#   make demo   set everything up, then train dense / SR-STE / BAME on the bundled digits and compare
#   make test   set everything up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The tested PyTorch: torchvision's ResNets and timm's DeiT need a torch/torchvision pair built together.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip's notes about package-index locations that do not exist here are noise, not errors.
QUIET  := 2>&1 | sed '/^WARNING: Location/d'

.PHONY: setup demo test lint gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET)
	$(BIN)/pip install -q $(TORCH) $(QUIET)
	$(BIN)/pip install -q -e '.[vision,tensorboard,test,lightning,hf,onnx]' $(TORCH) $(QUIET)
	touch $@

demo: setup
	$(BIN)/bame demo

test: setup
	$(BIN)/python -m pytest -q -n 2 tests

# On a machine with a CUDA GPU: the CUDA tests and bench_gpu.py (one line and exit 0 without a GPU).
gpu-check: setup
	bash benchmarks/gpu_check.sh

lint: setup
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check bame tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
