# The two commands: `make serve` and `make test`. Both build .venv the same way.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint bench bench-gpu clean

# torch goes in first and pinned: here that takes the CPU build already on disk, where a
# bare `torch` requirement would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# `make serve PORT=8001 HOST=0.0.0.0`; LORAMUX_PORT and LORAMUX_HOST work too.
serve: install
	$(BIN)/loramux models pull
	$(BIN)/loramux serve --demo $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/loramux bench engine --json bench-engine.json
	$(BIN)/loramux bench lora --json bench-lora.json
	$(BIN)/loramux bench api --json bench-api.json

# On a GPU machine, bare or not: no install, no network (infra/gpu/run_bench.sh says what it
# needs). Writes bench-gpu.json here, or under $$OUT when OUT is set.
bench-gpu:
	PYTHON=$(or $(wildcard $(BIN)/python),python3) bash infra/gpu/run_bench.sh --device cuda

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
