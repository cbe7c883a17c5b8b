# seqfuse: the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FAIRSEQ_PIN := fairseq-fixed==0.12.3.1
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90

.PHONY: install ext demo test test-fast cuda-check lint format bench clean

# Create .venv with the pinned set, fairseq-fixed (no build isolation, no
# torchaudio), and build the seqfuse._C extension in place.
$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-build-isolation --no-deps $(FAIRSEQ_PIN)
	-$(PIP) uninstall -q -y torchaudio 2>/dev/null
	touch $@

# Builds are serialised with a lock: several shells may share one tree.
install: $(VENV)/.deps
	flock /tmp/seqfuse-build.lock $(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -m seqfuse.info --short

ext: $(VENV)/.deps
	flock /tmp/seqfuse-build.lock $(PY) setup.py -q build_ext --inplace

demo: install
	$(PY) scripts/demo.py

test: install cuda-check lint
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -x tests -m "not slow"

# nvcc compiles every CUDA source for sm_80 and sm_90; device kernels are
# framework independent, so no CUDA torch is needed for this.
cuda-check:
	@command -v $(NVCC) >/dev/null || { echo "cuda-check: nvcc not found"; exit 1; }
	@set -e; for f in $$(find csrc -name '*.cu' | sort); do \
	  for a in $(CUDA_ARCHS); do \
	    echo "nvcc sm_$$a $$f"; \
	    $(NVCC) -std=c++17 -O2 -Icsrc -gencode arch=compute_$$a,code=sm_$$a \
	      --expt-relaxed-constexpr -Werror all-warnings -c $$f -o /tmp/seqfuse_cuda_check_$$a.o; \
	  done; \
	done; echo "cuda-check: ok"

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $$(find csrc -name '*.h' -o -name '*.cc' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')

format:
	$(VENV)/bin/ruff check --fix . ; $(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $$(find csrc -name '*.h' -o -name '*.cc' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')

bench: install
	$(PY) scripts/benchmark.py

clean:
	rm -rf build seqfuse/_C*.so *.egg-info
