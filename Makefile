# huayu: `make demo` sets up and runs the whole path on the bundled corpus; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU-only machines get the CPU wheel of torch; with CUDA present, pip picks the default (CUDA) build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[dev]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/huayu demo --out out/demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) out
