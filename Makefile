# Two entry points: `make demo` (set up + run the main job) and `make test` (set up + lint + tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime only (what a TPU host needs): no torch.
$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Tests, parity references (torch CPU), linting.
$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# The runtime install as users get it (requirements.txt alone: no torch, no libtpu).
RUNTIME_VENV ?= .venv-runtime
$(RUNTIME_VENV)/.runtime: requirements.txt pyproject.toml
	$(PY) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install -q --upgrade pip
	$(RUNTIME_VENV)/bin/pip install -q -r requirements.txt
	$(RUNTIME_VENV)/bin/pip install -q --no-deps -e .
	touch $@

.PHONY: setup lint test demo demo-chain bench runtime-check
setup: $(VENV)/.dev

lint: $(VENV)/.dev
	$(BIN)/ruff check unime_jax tests configs benchmarks notebooks
	$(BIN)/ruff format --check unime_jax tests configs benchmarks notebooks

test: lint
	$(BIN)/python -m pytest -q -ra
	$(MAKE) runtime-check

# Every entry point once in the runtime-only install (tests/runtime_check.py).
runtime-check: $(RUNTIME_VENV)/.runtime
	$(RUNTIME_VENV)/bin/python tests/runtime_check.py

demo: $(VENV)/.runtime
	$(BIN)/python -m unime_jax.main --config=configs/stage2.py:demo --workdir=runs/demo

# Stage 1 (MiniLM teacher: needs torch) then stage 2 from its merged checkpoint.
demo-chain: $(VENV)/.dev
	$(BIN)/python -m unime_jax.main --config=configs/stage1.py:demo --workdir=runs/demo_s1
	$(BIN)/python -m unime_jax.main --config=configs/stage2.py:demo --workdir=runs/demo_s2_chain \
		--config.model=runs/demo_s1/merged

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/embed_throughput.py
