# mtnorm: `make demo` trains and compares the methods on Fashion-MNIST; `make test` runs the suite.
# Both bootstrap everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
STAMP  := $(VENV)/.mtnorm-installed

.PHONY: all demo test lint bench data env clean

all: test

# The environment: a venv with the CPU build of torch 2.13.0 (pip finds it on this machine's disk),
# then mtnorm itself, editable, with its dev extras.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

# Debian ships Fashion-MNIST as a package; install it where apt-get exists and the files are missing.
data:
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ] || [ -n "$$MTNORM_FASHION_DIR" ]; then \
	  echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST missing and no apt-get: set MTNORM_FASHION_DIR to a folder with the idx files"; \
	fi

test: env data
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest

demo: env data
	$(VENV)/bin/mtnorm run

lint: env
	$(PY) -m ruff check src tests benchmarks

bench: env
	$(PY) benchmarks/bench_norm.py
	$(PY) benchmarks/bench_balance.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
