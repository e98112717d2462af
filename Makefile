# Two commands a new machine needs: `make test` and `make demo`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install test test-slow lint demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned: the CPU wheel; the project's own torch bound then installs nothing more.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev,launchers]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -m "not slow" -n 2 --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

demo: $(STAMP)
	$(BIN)/stemforge demo --input tests/data/blockfile/test1.blo --out demo_out

# Every benchmark (hours at full size); e.g. `make bench BENCH="--skip-long --skip-py4dstem"`.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH)

clean:
	rm -rf $(VENV) demo_out build *.egg-info .pytest_cache .ruff_cache
