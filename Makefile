# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv and installs everything it needs, system data included.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.edgeconv-installed
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install system-data clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml export/pyproject.toml runtime/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first, pinned: these releases lie on this machine's disk (others download GBs)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ./runtime -e ./export -e '.[dev]'
	touch $@

# Full Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
system-data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  echo "installing dataset-fashion-mnist (Debian package)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	fi

demo: $(STAMP)
	$(BIN)/edgeconv demo

test: $(STAMP) system-data
	$(BIN)/python -m pytest tests

# On a machine with an NVIDIA GPU (or a Jetson): fresh venv with the GPU extras, train, export,
# build engines, verify + bench every usable backend, pytest -m gpu; one table last (scripts/gpu_check.sh).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
