# Two entry points: `make repro` runs the pipeline, `make test` runs the tests.
# Both create .venv and install the pinned dependencies on first use.

VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PYTHON ?= python3.11
STAMP := $(VENV)/.installed

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install repro test

install: $(STAMP)

# torch first, pinned to the CPU build on this disk, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	# the real CLIP BPE vocabulary for the real-shape tests; its deps (torchvision, timm) are not needed
	$(BIN)/pip install --quiet --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

# two workers, one test file at a time each; one thread per process, so that they do not fight over
# the cores (torch's OpenMP threads spin while they wait)
TEST_WORKERS ?= 2

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile
