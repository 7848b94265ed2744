# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv if absent and installs what it needs. On a CUDA machine pick
# the torch build, e.g. `make test TORCH="torch==2.11.0"`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dysink-installed

.PHONY: demo test lint bench info clean

$(STAMP): pyproject.toml setup.py requirements/ci.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements/ci.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dysink_kernels demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only -q

info: $(STAMP)
	$(BIN)/python -m dysink_kernels info

clean:
	rm -rf $(VENV) build *.egg-info demo_out bench_out .pytest_cache .benchmarks
