# Two entry points: `make demo` (set up + run the main job) and `make test` (set up + lint + tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

.PHONY: setup lint test demo bench
setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check unime_jax tests configs benchmarks
	$(BIN)/ruff format --check unime_jax tests configs benchmarks

test: lint
	$(BIN)/python -m pytest -q -ra

bench: setup
	$(BIN)/python benchmarks/embed_throughput.py
