# Set-up and the two everyday commands. Everything installs into .venv from the project's own files.
#   make compare   install eesim and run the main job on the bundled defaults
#   make test      install eesim with its test and model dependencies and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch by exact version, so a machine without a GPU pulls no CUDA wheels.
# On a GPU machine, install your own torch first and run `make test TORCH=`.
TORCH ?= torch==2.13.0

.PHONY: compare test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH) -e '.[dev]'

compare: install
	$(BIN)/eesim compare

test: install-dev
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) eesim-out .pytest_cache .hypothesis
