# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv when missing and installs vlkit into it first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The demo needs the runtime dependencies only; the tests add transformers and open_clip (parity references).
STAMP := $(VENV)/.vlkit-installed
TEST_STAMP := $(VENV)/.vlkit-test-installed

.PHONY: demo test lint format install clean gpu-wheels gpu-check

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

# The GPU machine (torch 2.11, no network) lacks some pure-Python dependencies: fetch their wheels here, into the
# ignored .whl/, and carry that folder with the device call (run: carry [".whl"], command "make gpu-check").
GPU_WHEELS := .whl
GPU_SITE := /tmp/vlkit-site

gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download --no-deps --only-binary=:all: --dest $(GPU_WHEELS) \
		omegaconf==2.4.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth
	# inf-cl (a peer of the loss benchmark) only when a wheel exists: it must not need a build on the GPU machine.
	-$(PY) -m pip download --no-deps --only-binary=:all: --dest $(GPU_WHEELS) inf-cl

# The prepared GPU call (docs/benchmarks.md): every check and timing in one sequence of at most ~9 minutes, results
# under $OUT. DRY=1 rehearses it on the CPU at tiny sizes (the test suite does too).
gpu-check:
ifdef DRY
	$(MAKE) $(TEST_STAMP)
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m vlkit.bench.gpu_check --dry-run --out $${OUT:-gpu_check_out}
else
	python3 -m pip install --no-deps --no-index --quiet --target $(GPU_SITE) $(GPU_WHEELS)/*.whl
	PYTHONPATH=$(GPU_SITE):src PYTHONUNBUFFERED=1 python3 -m vlkit.bench.gpu_check --out $${OUT:-gpu_check_out}
endif

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
