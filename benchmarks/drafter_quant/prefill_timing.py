"""Prompt prefill and short passes of one GGUF on llama.cpp, 2 threads (the ad hoc timing
behind benchmarks/drafter_quant/README.md): python prefill_timing.py FILE."""

from __future__ import annotations

import statistics
import sys
import time

import llama_cpp


def main(path: str) -> None:
    m = llama_cpp.Llama(
        path, n_threads=2, n_threads_batch=2, n_ctx=2048, n_batch=512, n_ubatch=512, verbose=False
    )
    toks = [(i * 7919) % 150000 + 100 for i in range(700)]  # arbitrary ids, the same each run
    res = []
    for n in (256, 700):
        m.reset()
        t = time.perf_counter()
        m.eval(toks[:n])  # the last row's logits only
        res.append(f"prefill{n} {n / (time.perf_counter() - t):.0f} tok/s")
    one = []
    for i in range(12):
        t = time.perf_counter()
        m.eval([toks[i]])
        one.append(time.perf_counter() - t)
    four = []
    for i in range(5):
        t = time.perf_counter()
        m.eval(toks[i : i + 4])
        four.append(time.perf_counter() - t)
    res += [f"1tok {statistics.median(one) * 1000:.1f} ms"]
    res += [f"4tok {statistics.median(four) * 1000:.1f} ms"]
    print(path, *res, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
