# `make demo` and `make test` work on a fresh machine with only Python 3.10-3.13:
# each creates the virtual environment in $(VENV) on first use and installs the package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.npsparseattn-installed
EXTRAS ?= test,mpi,plot,bench

.PHONY: demo test lint bench clean-cache

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/npsparseattn demo

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check npsparseattn tests
	$(BIN)/ruff format --check npsparseattn tests

bench: $(STAMP)
	$(BIN)/npsparseattn bench attention

# numba caches compiled kernels next to their source and checks only that
# file's time stamp: after editing a helper module, drop the cache.
clean-cache:
	find npsparseattn -name '*.nbi' -delete -o -name '*.nbc' -delete
