# huayu: `make demo` sets up and runs the whole path on the bundled corpus; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU-only machines get the CPU wheel of torch; with CUDA present, pip picks the default (CUDA) build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup browser demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[dev]"
	touch $@

# The web UI test drives Debian's chromium + chromedriver; installed when missing and apt is ours to use.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else echo "chromium/chromedriver not installed and apt-get unavailable: the web UI browser test will be skipped"; fi; \
	fi

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/huayu demo --out out/demo
	printf '你好\n我最近压力很大，晚上睡不着。\n' | HF_HUB_OFFLINE=1 $(BIN)/huayu chat --max-new-tokens 48  # the bundled model

test: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) out
