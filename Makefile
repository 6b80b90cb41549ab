# The venv comes first on PATH so `mlflow run --env-manager local` finds its python.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
STAMP := $(VENV)/.installed
# Tests run in 2 processes (pytest-xdist); TEST_WORKERS=0 runs them in this one.
TEST_WORKERS ?= 2
PYTEST_ARGS ?= -n $(TEST_WORKERS)
BENCH_ARGS ?=

.PHONY: run test test-fast lint format ui bench bench-ddp lock clean fashion-mnist team-server

# The lock files pin every package with its hashes (`make lock` writes them; README, "Locked
# environment"). pip installs from them in hash-checking mode, then the project on its own.
$(STAMP): pyproject.toml requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	mlflow run . --env-manager local -P optimizer=adam

test: $(STAMP) fashion-mnist
	python -m pytest $(PYTEST_ARGS)

# The real Fashion-MNIST (60000 + 10000 images) from Debian's package, for the test that
# trains on it (tests/test_datasets.py). Installed only where it is missing and we are root
# (CI); anywhere else that test is skipped with the reason.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && apt-get install -y dataset-fashion-mnist; \
	elif [ ! -d $(FASHION_MNIST) ]; then \
		echo "$(FASHION_MNIST) is missing and this is not root with apt-get: the real" \
			"Fashion-MNIST test will be skipped (apt-get install dataset-fashion-mnist)"; \
	fi

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

# The team set-up, locally: PostgreSQL (runs and search studies) and an mlflow server on it,
# on 127.0.0.1 (deploy/team-server.sh; README, "Searches across hosts").
team-server: $(STAMP)
	PIPELINE_PYTHON=$(BIN)/python deploy/team-server.sh start

# The bench compares against PyTorch Lightning, an extra installed only for it.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/bench.txt
	python bench/run.py $(BENCH_ARGS)

# samples/s of 1 process vs N data-parallel ranks (2 on CPU, every GPU on CUDA), lenet5.
bench-ddp: $(STAMP)
	python bench/ddp.py $(BENCH_ARGS)

# One resolution for every platform (--universal) from the oldest Python pyproject.toml allows.
# uv prefers the pins already in a lock file: `make lock` after editing pyproject.toml changes
# only what it must; LOCK_ARGS=--upgrade moves everything to the newest releases. The
# constraints pip itself is configured with (pip.conf or PIP_CONSTRAINT, as `pip config list`
# shows them) bind the lock too, or pip here could not install what uv picked. dev and bench
# extend the runtime lock, never repin it.
LOCK_PYTHON := 3.11
LOCK_CONSTRAINTS ?= $(sort $(shell $(BIN)/python -m pip config list 2>/dev/null \
	| sed -n "s/^[^=]*[.]constraint='\(.*\)'$$/\1/p"))
LOCK_ARGS ?=
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --quiet --universal --generate-hashes \
	--python-version $(LOCK_PYTHON) --custom-compile-command 'make lock' \
	$(foreach c,$(LOCK_CONSTRAINTS),--constraint $(c)) $(LOCK_ARGS)

lock: $(STAMP)
	$(UV_COMPILE) -o requirements/runtime.txt
	$(UV_COMPILE) --extra dev --constraint requirements/runtime.txt -o requirements/dev.txt
	$(UV_COMPILE) --extra bench --constraint requirements/runtime.txt -o requirements/bench.txt
	$(BIN)/python -m pipeline.environment conda.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
