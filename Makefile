# alphagrpo-serve: every command a user or CI needs. `make help` lists them.
# On a fresh machine `make test` creates .venv, installs torch (CPU wheel here) *first* so that no
# CUDA build is pulled, installs the package with its native extension, and runs the test suite.

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS   ?=

.PHONY: help venv build test test-gpu bench clean

help:
	@echo "make test        set up .venv if needed, build the extension, run unit + integration tests"
	@echo "make build       (re)build the native extension in place (incremental)"
	@echo "make bench       kernel microbenchmarks on this machine -> benchmarks/out/, benchmarks/RESULTS.md"
	@echo "make test-gpu    GPU-marked tests only (needs CUDA)"
	@echo "make clean       remove build products (keeps .venv)"
	@echo "variables: PYTHON=$(PYTHON) VENV=$(VENV) TORCH_VERSION=$(TORCH_VERSION) PYTEST_ARGS=..."

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet --disable-pip-version-check setuptools wheel ninja
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test]"
	touch $@

venv: $(VENV)/.installed

build: venv
	$(PY) tools/gen_protos.py > /dev/null
	$(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: build
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

bench: build
	$(PY) benchmarks/kernels.py

clean:
	rm -rf build alphagrpo_serve/*.so *.egg-info
