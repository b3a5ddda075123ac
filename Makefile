# The two commands of the README:
#   make demo   - the main job: shard -> pretrain -> export -> k-NN on CPU, a few minutes
#   make test   - install everything from nothing and run the test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On a GPU machine whose Python already has its own CUDA torch:
#   make setup SYSTEM_TORCH=1   (venv sees system site-packages; torch/torchvision pins skipped)
SYSTEM_TORCH ?= 0
# Optional extras installed by setup; `make setup EXTRAS=dev` skips FFCV (and its Debian packages).
EXTRAS ?= dev,ffcv,demo
# FFCV 1.0.2 compiles against these at pip-install time (without them: "Could not find required package: opencv4").
DEB_PKGS := libturbojpeg0-dev libopencv-dev pkg-config libjpeg62-turbo-dev
export OMP_NUM_THREADS ?= 2
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# The venv's tools first (its `ninja` builds DeepSpeed's CPU op; two ninjas would rebuild it in turns).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Debian packages for the tests: shellcheck lints deploy/ scripts; slurm-wlm, munge and iproute2 run the Slurm
# cluster of tests/deploy/test_slurm*.py (tests skip, saying so, if absent or not root).
DEV_DEB_PKGS := shellcheck slurm-wlm munge iproute2

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml requirements/pins.txt setup.py pipelines/data/_crop_decode.c
	@set -e; \
	if echo "$(EXTRAS)" | grep -q ffcv && ! dpkg -s $(DEB_PKGS) >/dev/null 2>&1; then \
	  echo "installing Debian packages for FFCV: $(DEB_PKGS)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEB_PKGS) >/dev/null; \
	fi; \
	if echo "$(EXTRAS)" | grep -q dev && ! dpkg -s $(DEV_DEB_PKGS) >/dev/null 2>&1; then \
	  echo "installing Debian packages for the tests: $(DEV_DEB_PKGS)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEV_DEB_PKGS) >/dev/null; \
	fi; \
	if [ "$(SYSTEM_TORCH)" = 1 ]; then python3 -m venv --system-site-packages $(VENV); \
	  grep -vE '^(torch|torchvision)==' requirements/pins.txt > $(VENV)/pins.txt; \
	else python3 -m venv $(VENV); cp requirements/pins.txt $(VENV)/pins.txt; fi; \
	$(PIP) install -q --upgrade pip; \
	$(PIP) install -q -c $(VENV)/pins.txt -e '.[$(EXTRAS)]'; \
	touch $@

setup: $(VENV)/.installed

test: setup
	@if echo "$(EXTRAS)" | grep -q dev && ! dpkg -s $(DEV_DEB_PKGS) >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEV_DEB_PKGS) >/dev/null; \
	fi
	$(PY) -m pytest -q --durations=40 tests

# shard a real image set, pretrain under DeepSpeed (2 CPU processes), export, k-NN; ~2 min after setup.
# Pass DEMO_ARGS="--store s3://bucket/prefix" (with AWS_ENDPOINT_URL) to use object storage.
demo: setup
	$(PY) -m pipelines.demo $(DEMO_ARGS)

bench: setup
	$(PY) benchmarks/model_step.py

clean:
	rm -rf $(VENV) .cache .pytest_cache

# The GPU node check (benchmarks/gpu_check.py; README "Checking a GPU node"). Here, with network:
# `make wheelhouse` puts the wheels a node may lack into wheelhouse/ (git-ignored, ~8 MiB: 11 wheels
# for CPython 3.12 x86_64 at the versions of requirements/pins.txt). On the node, no venv, no network:
# `make gpu-check OUT=/some/dir` (GPU_CHECK_SMOKE=1: the same stages, tiny, on CPUs).
WHEELHOUSE ?= wheelhouse
GPU_CHECK_ARGS ?=
.PHONY: wheelhouse gpu-check

wheelhouse: setup
	$(PY) benchmarks/gpu_check.py wheelhouse $(WHEELHOUSE)

gpu-check:
	python3 benchmarks/gpu_check.py --wheelhouse $(WHEELHOUSE) $(if $(OUT),--out $(OUT)) \
	  $(if $(filter-out 0,$(GPU_CHECK_SMOKE)),--cpu) $(GPU_CHECK_ARGS)
