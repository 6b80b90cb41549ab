# The venv comes first on PATH so `mlflow run --env-manager local` finds its python.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test test-fast lint format ui bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	mlflow run . --env-manager local -P optimizer=adam

test: $(STAMP)
	python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	ruff check .
	ruff format --check .

format: $(STAMP)
	ruff check --fix .
	ruff format .

ui: $(STAMP)
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The bench compares against PyTorch Lightning, an extra installed only for it.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
