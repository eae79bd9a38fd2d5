#!/usr/bin/env bash
# The committed benchmark report (benchmarks/report) and the README's performance section:
# the Qwen2.5-Coder pair on both target backends, HumanEval and the six Spec-Bench
# categories, with llama.cpp's own llama-speculative and llama-bench beside the llama.cpp
# target (built by `make llama-tools`, cached). About 2 hours on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TOOLS=$(PY=$PY bash scripts/build_llama_tools.sh)
if [ "${SKIP_TORCH:-0}" != 1 ]; then
  $PY -m specsplit.faces.cli bench --target-backend torch --dtype bfloat16 --suite humaneval,spec-bench \
    --humaneval-limit 10 --limit 3 --max-new-tokens 128 --drafters model,tree,ngram --rtt 20 \
    --cloud-rtt "" --hf assisted --out bench_runs/report_torch
fi
$PY -m specsplit.faces.cli bench --target-backend llama.cpp --suite humaneval,spec-bench \
  --humaneval-limit 20 --limit 5 --max-new-tokens 64 --drafters model,ngram --rtt 0,80 \
  --cloud-rtt "" --llama-cpp-python prompt-lookup --llama-speculative "$TOOLS/llama-speculative" \
  --llama-bench "$TOOLS/llama-bench" --out bench_runs/report_llamacpp
mkdir -p benchmarks/report
cp bench_runs/report_torch/results.json benchmarks/report/results_torch.json
cp bench_runs/report_llamacpp/results.json benchmarks/report/results_llama.cpp.json
$PY -m specsplit.faces.cli bench-report benchmarks/report/results_torch.json \
  benchmarks/report/results_llama.cpp.json --out benchmarks/report --readme README.md
