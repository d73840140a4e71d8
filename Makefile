# mtnorm: `make demo` trains and compares the methods on Fashion-MNIST; `make test` runs the suite.
# Both bootstrap everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
STAMP  := $(VENV)/.mtnorm-installed
# The integration environment: real torchvision / timm / transformers models. torchvision's wheels
# need the registry's torch build (not the CPU wheel of .venv), so it is a venv of its own.
INT_VENV  ?= .venv-int
INT_PY    := $(INT_VENV)/bin/python
INT_STAMP := $(INT_VENV)/.mtnorm-installed

.PHONY: all demo test test-integrations lint bench data env integration-env clean

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

$(INT_STAMP): pyproject.toml
	test -x $(INT_PY) || $(PYTHON) -m venv $(INT_VENV)
	$(INT_PY) -m pip install -q --upgrade pip
	$(INT_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(INT_PY) -m pip install -q -e '.[dev,integrations]'
	touch $(INT_STAMP)

integration-env: $(INT_STAMP)

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

test: env data integration-env
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest
	MTNORM_INTEGRATION=1 $(INT_PY) -m pytest tests/integrations

test-integrations: integration-env
	MTNORM_INTEGRATION=1 $(INT_PY) -m pytest tests/integrations

demo: env data
	$(VENV)/bin/mtnorm run

lint: env
	$(PY) -m ruff check src tests benchmarks

bench: env
	$(PY) benchmarks/bench_norm.py
	$(PY) benchmarks/bench_balance.py
	$(PY) benchmarks/bench_compile.py

clean:
	rm -rf $(VENV) $(INT_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
