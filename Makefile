# pgwarden developer entry points. Every target that needs tools runs `setup`
# first; setup is cached (scripts/bootstrap.sh) so that costs ~1 s once done.
# Versions are pinned in scripts/versions.env.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV     := .venv
PY       := $(VENV)/bin/python
OPA      := .cache/bin/opa
PACKAGES := tap pgwarden policyd maskd
PYTEST_ARGS ?= -q -rfEs

.PHONY: help setup proto lint test up down demo bench

help:
	@echo "make demo   - start the local stack and run the scripted demo"
	@echo "make test   - set up, lint and run unit + integration tests (what CI runs)"
	@echo "make up     - start PostgreSQL, taps and Envoy locally (.run/env has the DSNs)"
	@echo "make down   - stop the local stack"
	@echo "make bench  - pgbench: direct vs envoy tcp vs pgbouncer vs gateway (BENCH_SECONDS=15)"
	@echo "make lint   - ruff, mypy --strict, opa fmt/check/test"
	@echo "make proto  - regenerate pgwarden/_proto from proto/"

setup:
	@bash scripts/bootstrap.sh

proto: setup
	$(PY) scripts/gen_proto.py

# The gate covers the packages (CONVENTIONS: ruff + mypy --strict on them) and the
# infrastructure scripts; test modules are linted by their authors (`ruff check tests`).
lint: setup
	$(VENV)/bin/ruff check $(PACKAGES) scripts bench tests
	$(VENV)/bin/mypy $(addprefix -p ,$(PACKAGES))
	@if [ -n "$$(find rego -name '*.rego' 2>/dev/null | head -n1)" ]; then \
		echo "opa fmt/check/test rego/"; \
		$(OPA) fmt --list --fail rego; \
		$(OPA) check --strict rego; \
		$(OPA) test rego; \
		$(OPA) test rego --coverage --threshold 90 > .cache/opa-coverage.json \
			|| { echo "opa test: coverage of rego/ is below 90% (report: .cache/opa-coverage.json)"; exit 1; }; \
	else echo "no .rego files yet: skipping opa checks"; fi

test: setup lint
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests/unit tests/integration

up: setup
	$(VENV)/bin/pgwarden up

down:
	@if [ -x $(VENV)/bin/pgwarden ]; then $(VENV)/bin/pgwarden down; else echo "nothing to stop"; fi

demo: up
	$(PY) -m pgwarden.demo

bench: setup
	$(PY) bench/run.py
