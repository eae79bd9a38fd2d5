#!/usr/bin/env bash
# The main job on loopback: a specsplit server with the target, an edge client drafting
# locally and verifying on it; the text streams, then the statistics.
set -euo pipefail
PY=${PY:-python3}
PORT=${PORT:-50051}
PROMPT=${PROMPT:-"Write a Python function that checks whether a number is prime, with a docstring and two examples."}
log=$(mktemp)
$PY -m specsplit.faces.cli serve --target qwen2.5-coder-1.5b --dtype auto --port "$PORT" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
echo "starting the server (target qwen2.5-coder-1.5b on torch) on 127.0.0.1:$PORT ..." >&2
until grep -q "specsplit serving" "$log"; do
  if ! kill -0 "$server" 2>/dev/null; then cat "$log" >&2; exit 1; fi
  sleep 1
done
$PY -m specsplit.faces.cli generate "$PROMPT" --server "127.0.0.1:$PORT" \
  --draft qwen2.5-coder-0.5b-iq4_nl --max-new-tokens 128
