# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv and installs everything it needs, system data included.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.edgeconv-installed
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install system-data data clean gpu-check mutants avx2-check

install: $(STAMP)

$(STAMP): pyproject.toml export/pyproject.toml runtime/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first, pinned: these releases lie on this machine's disk (others download GBs)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	# one distribution holds all three packages (pyproject.toml); a venv from before that also held edgeconv-runtime
	# and edgeconv-export, which would own the same modules: drop them
	$(BIN)/python -m pip uninstall -q -y edgeconv-runtime edgeconv-export 2>/dev/null || true
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Full Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
system-data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  echo "installing dataset-fashion-mnist (Debian package)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	fi

# The real datasets (MNIST IDX, hymenoptera, cats_and_dogs_small) into $$EDGECONV_DATA (default ../shared/data), from
# their public sources, sha256-checked (scripts/get_data.sh; cats_and_dogs_small has no official download: it says
# how to build it). Without them `make test` still passes: the data-bound tests skip, and the summary counts them.
data:
	bash scripts/get_data.sh

demo: $(STAMP)
	$(BIN)/edgeconv demo

test: $(STAMP) system-data
	$(BIN)/python -m pytest tests

# On a machine with an NVIDIA GPU (or a Jetson): fresh venv with the GPU extras, train, export,
# build engines, verify + bench every usable backend, pytest -m gpu; one table last (scripts/gpu_check.sh).
gpu-check:
	bash scripts/gpu_check.sh

# Mutation testing of the modules that hold the gates and guarantees (not in CI): each mutant in a copy of the tree
# against its module's tests, at most 30 per module (evenly spread) to stay under an hour on 2 cores;
# writes benchmarks/results/mutation.json. MUTANTS_ARGS="--module fileio --limit 0" for one whole module.
MUTANTS_ARGS ?= --limit 30
mutants: $(STAMP)
	$(BIN)/python scripts/mutants.py $(MUTANTS_ARGS)

# The INT8 and OpenVINO tests again on an emulated x86 CPU without VNNI (AVX2 only: ONNX Runtime and OpenVINO pick their
# saturating VPMADDUBSW kernels there): the shared fixtures are built natively into .fixtures/, then the same tests run under
# qemu-x86_64-static -cpu Haswell-v4 (Debian qemu-user-static), which reuses them.
AVX2_TESTS ?= tests/test_openvino.py tests/test_int8.py
avx2-check: $(STAMP)
	EDGECONV_TEST_FIXTURES=$(CURDIR)/.fixtures $(BIN)/python -m pytest $(AVX2_TESTS) -q -p no:cacheprovider
	EDGECONV_TEST_FIXTURES=$(CURDIR)/.fixtures qemu-x86_64-static -cpu Haswell-v4 $(BIN)/python -m pytest $(AVX2_TESTS) -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs .fixtures
