# The README's two commands: `make demo` and `make test`. Both set up a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One pinned torch build, installed before the project so nothing pulls another one.
# torch 2.14.1 + torchvision 0.29.1: the pair the FID libraries (torchvision) need; runs on CPU.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test demo bench bench-gpu presets clean

setup: $(VENV)/.installed

# Byte-compiled once, on every core: pip compiles file by file (95 of a 190 s install on 2 cores), and
# where PYTHONDONTWRITEBYTECODE is set nothing compiles on import, so every process would recompile torch.
# Files that are not Python 3.11 (templates, test data of some packages) fail to compile, as pip ignores.
# The test extra brings the server extra (mlflow[auth]: the tests and infra/local/up.sh run an MLflow server);
# the demo needs only the main dependencies.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile $(TORCH_PIN)
	$(BIN)/pip install --quiet --no-compile -e '.[test]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

# Two pytest processes (one test file each at a time, so module fixtures are built once): much of the suite
# waits on process starts and Ray's control plane, which two files at once overlap (1160 → 997 s on 2 cores).
TEST_PROCESSES ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder --durations=25

# The whole pipeline on this machine (local Ray, MLflow on SQLite, local disk, CPU); DEMO_FAST=1 for a quick run.
demo: setup
	$(BIN)/ddpm demo --dir demo

bench: setup
	$(BIN)/python bench/unet_cpu.py
	$(BIN)/python bench/attention_cpu.py
	$(BIN)/python bench/shard_throughput.py
	$(BIN)/python bench/train_cpu.py
	$(BIN)/python bench/sample_cpu.py
	$(BIN)/python bench/vs_diffusers.py

# One GPU's figures in about four minutes, written to bench/results/gpu-<time>/ (docs/gpu.md).
bench-gpu: setup
	$(BIN)/python bench/gpu.py

clean:
	rm -rf $(VENV) .pytest_cache
