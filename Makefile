# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LLAMA_CPP_VERSION := 0.3.36
# Portable x86-64 CPU build: AVX2 runs on nearly every home-lab CPU. Not GGML_NATIVE: on CPUs
# that report AMX (Sapphire Rapids and later) llama.cpp's AMX kernels crash inside some VMs.
# GPU boxes build with LLAMA_CMAKE_ARGS="-DGGML_CUDA=on" instead.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
# Outside the checkout, so every clone on this machine (CI's included) reuses one build.
WHEELHOUSE ?= $(HOME)/.cache/tokenfarm/wheelhouse/llama-cpp-python-$(LLAMA_CPP_VERSION)-avx2
LLAMA_WHEEL_STAMP := $(WHEELHOUSE)/.built
PIP := $(BIN)/pip install --quiet --disable-pip-version-check --find-links $(WHEELHOUSE) --only-binary llama-cpp-python

.PHONY: demo test install install-test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip

# llama-cpp-python builds from source (minutes on 2 cores): build the wheel once, keep it.
$(LLAMA_WHEEL_STAMP): | $(BIN)/python
	mkdir -p $(WHEELHOUSE)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip wheel --no-cache-dir --no-deps --disable-pip-version-check -w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

# torch pinned to the CPU build: an unpinned torch pulls a multi-GB CUDA build onto CPU-only machines.
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml $(LLAMA_WHEEL_STAMP)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[llamacpp,orchestrator,dashboard,torch]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[llamacpp,orchestrator,dashboard,torch,test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/tokenfarm demo

# --durations=15 so CI's log names the slow tests; -n 2: two xdist workers (one per core), each with its
# own Redis database and PostgreSQL databases copied from one migrated template (tests/integration/conftest.py).
# worksteal: a worker that runs out of tests takes half of the other's, so the slow chaos tests at
# the end of one worker's list do not leave the other core idle.
PYTEST_ARGS ?= -n 2 --dist worksteal
test: install-test
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
