# The two commands of the README: `make serve` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: serve test lint check models bench clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# the service alone on the CPU: no torch
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu]'
	touch $@

# everything: training/export (torch, CPU build), the test tools, Ray Serve (tests/deploy/) and MkDocs
# (tests/unit/test_docs.py builds the documentation site)
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu,train,hf,dev,ray,docs]'
	touch $@ $(VENV)/.runtime

# what the tests need from the system (Chromium, a compose client): installed with apt, or a
# message saying what to install where that cannot work (no root)
system-deps:
	@./tools/system-deps

serve: $(VENV)/.runtime
	$(BIN)/python -m service --port $(PORT)

test: $(VENV)/.dev system-deps
	$(BIN)/python -m pytest

lint: $(VENV)/.dev system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy service vitserve
	$(BIN)/hadolint Dockerfile
	@if docker compose version >/dev/null 2>&1; then docker compose config -q; else docker-compose config -q; fi
	@echo "Dockerfile and docker-compose.yml check out"

check: lint test

# retrain and re-export the shipped models from scratch
models: $(VENV)/.dev
	$(BIN)/python -m export vit --force
	$(BIN)/python -m export detr --force
	$(BIN)/python -m export imagetransformer --force  # after the ViT, which judges its digits

bench: $(VENV)/.dev
	$(BIN)/python -m bench.models
	$(BIN)/python -m bench.service
	$(BIN)/python -m bench.generation
	$(BIN)/python -m bench.fast_path
	$(BIN)/python -m bench.peers
	$(BIN)/python -m bench.deploy
	$(BIN)/python -m bench.hf

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
