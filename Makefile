# Set-up from nothing, then run. `make test` is what CI runs; `make quickstart` is the pipeline on CPU.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zephyr-installed

.PHONY: test quickstart lint format setup assets clean

setup: $(STAMP)

# torch first, pinned: this machine has the 2.13.0 CPU build on disk, an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

assets: $(STAMP)
	$(BIN)/zephyr assets fetch smollm2-135m-instruct
	$(BIN)/zephyr assets fetch mistral-7b-tokenizer
	$(BIN)/zephyr assets fetch mt-bench
	$(BIN)/zephyr assets fetch alpaca-eval-templates

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

test: lint assets
	$(BIN)/python -m pytest -q

quickstart: assets
	bash scripts/quickstart.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
