# Everything a fresh machine needs: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: help setup run up down test bench soak faults lint typecheck contract-check compose-check clean

help:
	@echo "make run    set up, start the broker, create topics and run every service (Ctrl-C stops all)"
	@echo "make test   set up, then ruff, mypy, contract and compose checks, and the test suite"
	@echo "make up / make down   the same stack in the background"
	@echo "make bench  throughput and latency of the stack against a raw Kafka pipeline"
	@echo "make soak   the stack at a steady rate for 30 minutes: memory, state, broker disk, restore time"
	@echo "            (SOAK_ARGS passes options, for example SOAK_ARGS='--orders 110000')"
	@echo "make faults the full fault-injection run (every fault several times under load) and its report"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when the dependency list changes, so a second run downloads nothing.
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(INSTALLED)
	bash scripts/install-system-packages.sh
	$(BIN)/choreo broker fetch

run: setup
	$(BIN)/choreo run

up: setup
	$(BIN)/choreo up --detach

down: setup
	$(BIN)/choreo down

lint: setup
	$(BIN)/ruff check schemas services tests benchmarks
	$(BIN)/ruff format --check schemas services tests benchmarks

typecheck: setup
	$(BIN)/mypy

contract-check: setup
	$(BIN)/choreo schemas export --check

compose-check:
	bash scripts/check-compose.sh

# Tests that start, stop or restart brokers, or load the whole stack (`slow`), run one at a time; the others
# in TEST_WORKERS processes, each with a broker of its own, as they mostly wait on the broker and processes.
TEST_WORKERS ?= 2
test: setup lint typecheck contract-check compose-check
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS)
	$(BIN)/python -m pytest -m slow

bench: setup
	$(BIN)/choreo bench

SOAK_ARGS ?=
soak: setup
	$(BIN)/choreo soak $(SOAK_ARGS)

# `make test` runs one pass of each fault; this runs each several times, longer and at a higher rate.
faults: setup
	CHOREO_FAULTS=full $(BIN)/python -m pytest tests/faults

clean:
	rm -rf .run .mypy_cache .ruff_cache .pytest_cache .hypothesis
