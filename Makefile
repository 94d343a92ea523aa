# One command each: `make demo` (sets up and runs the end-to-end demo), `make test` (sets up and runs the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo team-demo test lint bench bench-quick chaos up

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/agenthub demo

team-demo: setup
	$(BIN)/agenthub team demo

up: setup
	$(BIN)/agenthub up

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python -m bench.bench_eventlog
	$(BIN)/python -m bench.bench_routing
	$(BIN)/python -m bench.bench_http
	$(BIN)/python -m bench.bench_team

# CI: every benchmark script still runs (small sizes; figures printed, not judged)
bench-quick: setup
	$(BIN)/python -m bench.bench_eventlog --quick
	$(BIN)/python -m bench.bench_routing --quick
	$(BIN)/python -m bench.bench_http --quick
	$(BIN)/python -m bench.bench_team --quick
	$(BIN)/python -m bench.chaos --quick

# A soak: clients over HTTP while actors are killed and Postgres is restarted at random; fails on a broken promise
# (options: make chaos CHAOS_ARGS="--seconds 300 --seed 3"; python -m bench.chaos --help)
chaos: setup
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)
