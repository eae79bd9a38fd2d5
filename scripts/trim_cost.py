"""What one ``malloc_trim`` costs a busy server: 8 sessions of HumanEval prompts on the
bfloat16 Qwen 1.5B target, 24 batched one-token passes (cloud-only's decoding), every other
one right after a trim (whose pages the pass must fault in again); median pass times.

    python scripts/trim_cost.py DRAFTS   # a recorded_drafts.json of bench.split
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import statistics
import sys
import time
from pathlib import Path

from specsplit.backends.load import load_backend


def main() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(-8, 2)  # M_ARENA_MAX, as serve
    recs = json.loads(Path(sys.argv[1]).read_text())
    target = load_backend("torch", "qwen2.5-coder-1.5b", n_ctx=4096, dtype="bfloat16")
    seqs = [target.new_sequence() for _ in range(8)]
    target.prefill_batch([(s, r["prompt_ids"]) for s, r in zip(seqs, recs, strict=False)])

    def step(i: int) -> float:
        t0 = time.perf_counter()
        target.forward_batch([(s, [100 + i], None) for s in seqs])
        return time.perf_counter() - t0

    for i in range(3):  # warm-up
        step(i)
    passes: dict[str, list[float]] = {"untrimmed": [], "after a trim": []}
    trims = []
    for i in range(24):
        if i % 2:
            t0 = time.perf_counter()
            libc.malloc_trim(0)
            trims.append(time.perf_counter() - t0)
        passes["after a trim" if i % 2 else "untrimmed"].append(step(i))
    for k, v in passes.items():
        print(f"8 x 1 pass, {k}: {statistics.median(v) * 1000:.1f} ms (median of {len(v)})")
    print(f"malloc_trim: {statistics.median(trims) * 1000:.1f} ms (median)")


if __name__ == "__main__":
    main()
