#!/usr/bin/env bash
# Build llama.cpp's own `llama-speculative` and `llama-bench` from the llama.cpp sources that
# the llama-cpp-python sdist of the pinned version vendors (fetched from the package index),
# for the benchmark comparison. Outside the package; cached: a second run does nothing.
# About 15 minutes on 2 cores. Prints the folder holding the two binaries.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PY:-python3}
CACHE=${SPECSPLIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/specsplit}
OUT="$CACHE/llama-tools/$VERSION-$($PY "$(dirname "$0")/llama_cpu.py" variant)"
if [ -x "$OUT/llama-speculative" ] && [ -x "$OUT/llama-bench" ]; then
  echo "$OUT"
  exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
$PY -m pip download -q --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION" >&2
tar xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
# the same CPU flags as the llama-cpp-python build in the Makefile (scripts/llama_cpu.py)
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_SERVER=OFF $($PY "$(dirname "$0")/llama_cpu.py" cmake) >&2
cmake --build "$WORK/build" --target llama-speculative llama-bench -j "${JOBS:-2}" >&2
mkdir -p "$OUT"
cp "$WORK/build/bin/llama-speculative" "$WORK/build/bin/llama-bench" "$OUT/"
echo "$OUT"
