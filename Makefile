# Set-up from nothing, then run. `make test` is what CI runs; `make quickstart` is the pipeline on CPU.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zephyr-installed

.PHONY: test test-fast quickstart lint mypy-baseline format setup assets browser clean

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
	$(BIN)/zephyr assets fetch ultrafeedback-templates

# Style, the import-layer contract (pyproject.toml [tool.importlinter]), and types: mypy, strict for the modules
# pyproject.toml names, elsewhere no error that tools/mypy-baseline.txt does not list.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python tools/mypy_baseline.py

# After fixing type errors (or moving code that has some): rewrite the baseline, review its diff.
mypy-baseline: $(STAMP)
	$(BIN)/python tools/mypy_baseline.py --update

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks tools
	$(BIN)/ruff format src tests benchmarks tools

# Headless Chromium for the report page test (Debian's package; the test skips where it is absent).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q chromium >/dev/null 2>&1; } || echo "chromium not installed: the report page test will skip"

test: lint assets browser
	$(BIN)/python -m pytest -q

# The edit-test loop: every test but the slow ones (a minute or two on 2 cores); `make test` runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The whole pipeline on CPU into runs/quickstart (a rerun skips finished stages; rm -rf runs/quickstart to redo).
quickstart: assets
	$(BIN)/zephyr run recipes/quickstart.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
