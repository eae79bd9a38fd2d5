# specsplit: `make demo` runs the main job on the default models, `make test` runs the tests.
PY ?= python3
PIP = $(PY) -m pip
PROMPT ?= Write a Python function that checks whether a number is prime, with a docstring and two examples.

.PHONY: setup demo demo-local test test-slow lint bench llama-tools

# llama.cpp built for this machine's CPU: AVX-512 where it has it, else AVX2, never AMX
# (scripts/llama_cpu.py says why); rebuilt only if the installed one is not this build
LLAMA_VARIANT := $(shell $(PY) scripts/llama_cpu.py variant)
LLAMA_CMAKE := $(shell $(PY) scripts/llama_cpu.py cmake)

# the llama-cpp-python wheel, built once (about 8 minutes) and kept here, so a fresh
# virtual environment (an edge-only install, tests/test_install.py) installs it without a build
WHEELS = build/wheels/$(LLAMA_VARIANT)
LLAMA_WHEEL = $(WHEELS)/llama_cpp_python-0.3.36-*.whl

setup:  ## install everything (the pinned CPU torch first, so no CUDA build is pulled)
	$(PIP) install -q torch==2.13.0
	ls $(LLAMA_WHEEL) >/dev/null 2>&1 || CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CMAKE)" \
		$(PIP) wheel -q --no-cache-dir --no-deps -w $(WHEELS) llama-cpp-python==0.3.36
	$(PY) scripts/llama_cpu.py check || $(PIP) install -q --force-reinstall --no-deps $(LLAMA_WHEEL)
	$(PIP) install -q -e ".[all,dev]"

demo: setup  ## a server with the target and an edge client on loopback, text streaming
	$(PY) -m specsplit.faces.cli models fetch qwen2.5-coder-1.5b qwen2.5-coder-0.5b-iq4_nl
	PY=$(PY) PROMPT="$(PROMPT)" bash scripts/demo.sh

demo-local:  ## the same on one process (no server)
	$(PY) -m specsplit.faces.cli generate "$(PROMPT)" --dtype auto --max-new-tokens 128

test: setup  ## unit, exactness and integration tests (SmolLM2-135M); slow ones excluded
	$(PY) -m pytest -q

bench: setup llama-tools  ## the committed benchmark report and README section (about 2 h here)
	$(PY) -m specsplit.faces.cli models fetch qwen2.5-coder-1.5b qwen2.5-coder-0.5b-iq4_nl
	PY=$(PY) bash scripts/bench_report.sh

llama-tools:  ## llama.cpp's llama-speculative and llama-bench, built from the pinned sdist (~15 min, cached)
	PY=$(PY) bash scripts/build_llama_tools.sh

test-slow: setup  ## the slow tests on the Qwen models
	$(PY) -m pytest -q -m slow

lint:
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests
