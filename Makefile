# Every target installs what it needs, idempotently (a second run only rebuilds what changed).
#   make demo    SqueezeNet 1.1: swap in FusedFire, check outputs, latency table (~1 min)
#   make test    the whole test suite: pytest + the C++ (CMake/ctest) test
#   make bench   pytest-benchmark suites in bench/ + the CLI benchmark with its PNG plot
PY      ?= python3
PIP     ?= $(PY) -m pip
TORCH   ?= torch==2.14.1 torchvision==0.29.1
STAMP   := build/.stamps
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml
CMAKE_BUILD ?= build/cmake

.PHONY: all deps build demo test pytest ctest bench clean

all: build

$(STAMP)/torch:
	@mkdir -p $(STAMP)
	$(PY) -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null \
	  || $(PIP) install -q $(TORCH)
	@touch $@

$(STAMP)/deps: $(STAMP)/torch pyproject.toml
	$(PIP) install -q numpy safetensors tqdm pytest hypothesis expecttest scikit-learn
	@touch $@

$(STAMP)/bench-deps: $(STAMP)/deps
	$(PIP) install -q pytest-benchmark matplotlib onnxruntime onnx onnxscript
	@touch $@

# Editable build against the installed torch (no build isolation: the ABI must match it).
$(STAMP)/build: $(STAMP)/deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

deps: $(STAMP)/deps
build: $(STAMP)/build

demo: build
	$(PY) -m sqz_kernels demo

pytest: build
	$(PY) -m pytest tests -q

ctest: deps
	@command -v cmake >/dev/null || $(PIP) install -q cmake
	cmake -S . -B $(CMAKE_BUILD) $$(command -v ninja >/dev/null && echo -G Ninja) \
	  -DPython3_EXECUTABLE=$$(command -v $(PY)) > /dev/null
	cmake --build $(CMAKE_BUILD) -j2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

test: pytest ctest

bench: build $(STAMP)/bench-deps
	$(PY) -m pytest bench/bench_fire.py bench/bench_squeezenet.py bench/bench_codebook.py -q \
	  --benchmark-only --benchmark-json=bench/results/latest.json
	$(PY) bench/summarize.py bench/results/latest.json
	$(PY) bench/report.py
	$(PY) -m sqz_kernels bench --plot bench/results/fire_speedups.png

clean:
	rm -rf build $(CMAKE_BUILD) sqz_kernels/_C*.so *.egg-info
