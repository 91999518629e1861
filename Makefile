# Two entry points, each sets itself up on a fresh machine (venv, pip, apt) and is quick
# when already set up:  `make demo` runs the main job, `make test` runs the whole suite.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the test suite needs (installed only where missing).
SYSTEM_PACKAGES ?= slurm-wlm munge
# What DeepSpeed's first use needs: it compiles its CPU ops (shm comm, cpu_adam) with a C++
# compiler against Python's headers (torch.utils.cpp_extension); without them the demo
# ended in a ninja "Error building extension" traceback.
# The Python they are checked for: the venv's where it exists (what runs), else $(PYTHON).
PY_VERSION := import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")
HAS_HEADERS := import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))

export DS_ACCELERATOR ?= cpu
# DeepSpeed builds its CPU ops (shm comm, cpu_adam) at first use; one build folder per
# checkout, so two checkouts running at once never rebuild over each other's files.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

# The Triton of the GPU machine the kernels are measured on (torch 2.11 pins 3.6), kept
# beside ours: tests/test_dcnv3_triton.py compiles the kernels for sm_90 with both.
GPU_TRITON ?= 3.6.0
export GPU_TRITON_DIR ?= $(CURDIR)/$(VENV)/triton-$(GPU_TRITON)

.PHONY: demo test lint setup system-deps build-deps gpu-triton clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat mode: the repo root goes on sys.path, so new top-level packages import at once.
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

gpu-triton: $(GPU_TRITON_DIR)/.installed

$(GPU_TRITON_DIR)/.installed: | $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(GPU_TRITON_DIR) triton==$(GPU_TRITON)
	touch $@

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	    echo "make: missing system packages:$$missing (install them, e.g. sudo apt-get install$$missing; as root on Debian/Ubuntu make installs them)"; exit 1; fi; \
	  echo "apt-get install$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi

# A C++ compiler and Python's headers, installed where missing (Debian/Ubuntu as root),
# else named in one line before anything runs.
build-deps:
	@py=$(PY); [ -x "$$py" ] || py=$(PYTHON); cxx="$${CXX:-c++}"; \
	dev="python$$("$$py" -c '$(PY_VERSION)')-dev"; \
	ready() { command -v "$${cxx%% *}" >/dev/null 2>&1 && "$$py" -c '$(HAS_HEADERS)'; }; \
	if ! ready; then \
	  if command -v dpkg >/dev/null; then $(MAKE) --no-print-directory system-deps SYSTEM_PACKAGES="g++ $$dev" || exit 1; fi; \
	  if ! ready; then \
	    echo "make: DeepSpeed compiles its CPU ops at first use: it needs a C++ compiler ($$cxx) and Python's headers (Python.h), e.g. the packages g++ $$dev"; exit 1; fi; fi

demo: $(STAMP) build-deps
	# a new run directory each time: an existing run is never overwritten
	$(VENV)/bin/internimage pretrain --output-dir runs/demo/$$(date +%Y%m%d-%H%M%S)

lint: $(STAMP)
	$(PY) -m ruff check .

# Two pytest workers (pytest-xdist), each running whole test files (module fixtures such as
# a shared reference run stay one per file); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

test: $(STAMP) gpu-triton system-deps build-deps lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=40 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
