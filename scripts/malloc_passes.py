"""Target passes under two malloc settings of `specsplit serve`, each in a fresh process
(alternating, twice): glibc's mmap threshold fixed at 128 KiB (the earlier setting: every
larger block mmapped, returned when freed) against the current one (glibc's own threshold,
free pages given back by ``malloc_trim`` every second). Qwen 1.5B, bfloat16, all cores:
four HumanEval prompts prefilled (medians of 3), eight one-token passes after a prompt.

    python scripts/malloc_passes.py DRAFTS   # a recorded_drafts.json of bench.split
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(mode: str, drafts: str) -> None:
    if mode == "fixed-threshold":
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    else:
        from specsplit.faces.serve import _tune_malloc

        _tune_malloc()
    from specsplit.backends.load import load_backend

    recs = json.loads(Path(drafts).read_text())
    target = load_backend("torch", "qwen2.5-coder-1.5b", n_ctx=4096, dtype="bfloat16")

    def prefill(ids: list[int]) -> float:
        s = target.new_sequence()
        t0 = time.perf_counter()
        target.prefill_batch([(s, ids)])
        t = time.perf_counter() - t0
        target.free_sequence(s)
        return t

    def decode() -> float:
        s = target.new_sequence()
        target.prefill(s, recs[0]["prompt_ids"])
        t0 = time.perf_counter()
        for i in range(8):
            target.forward(s, [100 + i])
        t = time.perf_counter() - t0
        target.free_sequence(s)
        return t

    prefill(recs[1]["prompt_ids"][:20])  # warm-up
    p = statistics.median(sum(prefill(r["prompt_ids"]) for r in recs[:4]) for _ in range(3))
    d = statistics.median(decode() for _ in range(3))
    print(f"{mode}: 4 prefills {p:.2f} s, 8 one-token passes {d:.2f} s", flush=True)


def main() -> None:
    if sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    for _ in range(2):
        for mode in ("fixed-threshold", "trim"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, sys.argv[1]],
                capture_output=True,
                text=True,
                check=True,
            )
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
