# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv when missing and installs vlkit into it first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The demo needs the runtime dependencies only; the tests add transformers and open_clip (parity references).
STAMP := $(VENV)/.vlkit-installed
TEST_STAMP := $(VENV)/.vlkit-test-installed

.PHONY: demo test lint format install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# --no-compile: pip would byte-compile all of torch (~25 s on 2 cores); Python compiles what is imported, once.
PIP := $(BIN)/pip install --no-compile

$(STAMP): $(BIN)/python pyproject.toml
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) -e '.[test]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/vlkit demo

# The suite starts many Python processes (torchrun ranks, CLI runs): each would compile torch's sources anew under
# PYTHONDONTWRITEBYTECODE (set on some machines), ~10 s per process on 2 cores; cached bytecode is read instead.
test: $(TEST_STAMP)
	$(BIN)/ruff check src tests
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(TEST_STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
