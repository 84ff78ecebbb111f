# fleetmesh — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

.PHONY: venv
venv: $(STAMP) ## Create or update the local virtualenv (.venv)

.PHONY: run
run: venv ## Start the embedded platform with a small simulated fleet
	$(BIN)/fleetmesh up --demo-devices 5

.PHONY: test
test: venv ## Run every test tier (unit, integration, e2e)
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: venv ## Run the unit tests only
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

.PHONY: lint
lint: venv ## ruff, ruff format --check, mypy --strict on src/, import-linter
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/lint-imports

.PHONY: format
format: venv ## Format and fix what ruff can
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

.PHONY: bench
bench: venv ## Run every benchmark and print figures beside their physical limits
	$(BIN)/fleetmesh bench all

.PHONY: clean
clean: ## Remove the virtualenv, caches and the local data dir
	rm -rf $(VENV) .fleetmesh .pytest_cache .mypy_cache .ruff_cache

.PHONY: help
help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'
