# The README's two commands: `make demo` and `make test`. Both set up a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One pinned torch build, installed before the project so nothing pulls another one.
# torch 2.14.1 + torchvision 0.29.1: the pair the FID libraries (torchvision) need; runs on CPU.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test demo bench presets clean

setup: $(VENV)/.installed

# --no-compile: byte-compiling every file of torch, ray and mlflow took half the install (95 of 190 s);
# Python compiles the modules it imports, once, on first use.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile $(TORCH_PIN)
	$(BIN)/pip install --quiet --no-compile -e '.[test]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q --durations=25

# The whole pipeline on this machine (local Ray, MLflow on SQLite, local disk, CPU); DEMO_FAST=1 for a quick run.
demo: setup
	$(BIN)/python -m pipelines.demo --dir demo

bench: setup
	$(BIN)/python bench/unet_cpu.py
	$(BIN)/python bench/shard_throughput.py
	$(BIN)/python bench/train_cpu.py
	$(BIN)/python bench/sample_cpu.py
	$(BIN)/python bench/vs_diffusers.py

clean:
	rm -rf $(VENV) .pytest_cache
