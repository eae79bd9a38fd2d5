# specsplit: `make demo` runs the main job on the default models, `make test` runs the tests.
PY ?= python3
PIP = $(PY) -m pip
PROMPT ?= Write a Python function that checks whether a number is prime, with a docstring and two examples.

.PHONY: setup demo test test-slow lint bench

setup:  ## install everything (the pinned CPU torch first, so no CUDA build is pulled)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,bench]"

demo: setup  ## speculative decoding on the default models, with its statistics
	$(PY) -m specsplit.faces.cli models fetch qwen2.5-coder-1.5b qwen2.5-coder-0.5b
	$(PY) -m specsplit.faces.cli generate "$(PROMPT)" --max-new-tokens 128

test: setup  ## unit, exactness and integration tests (SmolLM2-135M); slow ones excluded
	$(PY) -m pytest -q

test-slow: setup  ## the slow tests on the Qwen models
	$(PY) -m pytest -q -m slow

lint:
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests
