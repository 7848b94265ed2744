# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv if absent and installs what it needs. On a CUDA machine pick
# the torch build, e.g. `make test TORCH="torch==2.11.0"`.
# `make test-triton-next` runs the Triton tests again with the newest supported Triton
# (requirements/ci-next.txt) in a second environment, build/venv-next.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dysink-installed
# The second environment imports the package from this checkout (PYTHONPATH): the
# C++ extension built by `make test` is used when present, else its tests skip.
VENV_NEXT  ?= build/venv-next
STAMP_NEXT := $(VENV_NEXT)/.dysink-installed
NEXT_TESTS ?= tests/test_triton_attn.py tests/test_triton_small_ops.py tests/test_fp8.py \
	tests/test_kernel_report.py

.PHONY: demo test test-triton-next lint bench info clean

$(STAMP): pyproject.toml setup.py requirements/ci.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements/ci.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

$(STAMP_NEXT): requirements/ci-next.txt
	test -x $(VENV_NEXT)/bin/python || $(PYTHON) -m venv $(VENV_NEXT)
	$(VENV_NEXT)/bin/python -m pip install -q "$(TORCH)"
	$(VENV_NEXT)/bin/python -m pip install -q -r requirements/ci-next.txt
	touch $(STAMP_NEXT)

demo: $(STAMP)
	$(BIN)/python -m dysink_kernels demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

test-triton-next: $(STAMP_NEXT)
	PYTHONPATH=$(CURDIR) $(VENV_NEXT)/bin/python -m pytest $(NEXT_TESTS) -q
	PYTHONPATH=$(CURDIR) $(VENV_NEXT)/bin/python -m pytest tests/ops -q -k triton

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only -q

info: $(STAMP)
	$(BIN)/python -m dysink_kernels info

clean:
	rm -rf $(VENV) build *.egg-info demo_out bench_out .pytest_cache .benchmarks
