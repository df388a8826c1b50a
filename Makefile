# `make demo` and `make test` work on a fresh machine with only Python 3.10-3.13:
# each creates the virtual environment in $(VENV) on first use and installs the package.
# `make test` first compiles every CPU kernel into numba's cache on all cores (`npsparseattn compile`;
# a no-op when the cache is warm), then runs the suite in one pytest worker per core (pytest-xdist).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.npsparseattn-installed
EXTRAS ?= test,mpi,plot,bench,docs,cuda,interop

.PHONY: demo test lint bench docs asv-smoke clean-cache test-cudasim gpu-check check-wheel

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/npsparseattn demo

test: $(STAMP) lint
	$(BIN)/npsparseattn compile
	$(BIN)/python -m pytest -n auto --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check npsparseattn tests asv_benchmarks docs/conf.py
	$(BIN)/ruff format --check npsparseattn tests asv_benchmarks docs/conf.py

bench: $(STAMP)
	$(BIN)/npsparseattn bench attention

# numba-cuda kernels executed on the host by the CUDA simulator, every kernel through the public API
# (a separate run: NUMBA_ENABLE_CUDASIM must be set before numba is imported; docs/testing.md).
test-cudasim: $(STAMP)
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -n auto tests/cudasim

# The first thing to run on a GPU machine: in the first 5 minutes the cupy backend's probes (registers and
# occupancy, small cases of every launch path, compute-sanitizer memcheck/racecheck/synccheck where the tool is,
# a case over 2^31 elements), then every gpu-marked test and the GPU benchmarks, within 360 s in all;
# gpu-check.log, gpu-check.md and the benchmark JSON in $(GPU_CHECK_OUT).  Runs the machine's own python3
# (CuPy, numba-cuda, PyTorch) on this checkout and installs nothing, so it needs no network.
# `python3 tools/gpu_check.py OUT --dry-run` prints the plan without running it.
GPU_CHECK_OUT ?= build/gpu-check
gpu-check:
	$(PYTHON) tools/gpu_check.py $(GPU_CHECK_OUT)

# The built wheel, installed into a fresh virtual environment (no network: --no-deps, the dependencies are
# this environment's), runs one emulated backend="cupy" call from outside the checkout: package data such as
# the CUDA sources and the emulation headers must be in the wheel (an editable install would hide a gap).
check-wheel: $(STAMP)
	$(BIN)/python tools/check_wheel.py

# The documentation site; Sphinx warnings are errors.
docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# Every asv benchmark once at a small size, in the current environment (no results kept).
asv-smoke: $(STAMP)
	cd asv_benchmarks && $(abspath $(BIN))/asv machine --yes >/dev/null
	cd asv_benchmarks && NPSPARSEATTN_ASV_QUICK=1 $(abspath $(BIN))/asv run --python=same --quick --dry-run --show-stderr

# numba caches compiled kernels (CPU and numba-cuda alike) next to their source
# and checks only that file's time stamp: after editing a helper module, drop
# the cache.  NUMBA_CACHE_DIR, when set, holds them instead.
clean-cache:
	find npsparseattn -name '*.nbi' -delete -o -name '*.nbc' -delete
	if [ -n "$$NUMBA_CACHE_DIR" ]; then find "$$NUMBA_CACHE_DIR" -name '*.nbi' -delete -o -name '*.nbc' -delete; fi
