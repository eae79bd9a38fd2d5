"""What a verification pass costs on this machine, for the capacity model (docs/scaling.md).

    python -m specsplit.bench.costs --threads 1,2 --out benchmarks/ray_costs

For B sessions each with a context of ``--context`` tokens, one batched pass over T new
tokens per session (``forward_batch``, as the scheduler runs it), B in ``--batch``, T in
``--tokens``: the median of ``--repeats`` passes after one untimed pass. Also the KV bytes
one token holds and the model's weight bytes. Results go to ``--out``/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from specsplit.backends.load import DTYPES


def measure(target, batch: list[int], tokens: list[int], context: int, repeats: int) -> list:  # noqa: ANN001
    """[(B, T, seconds)] for one batched pass of T new tokens in each of B sessions."""
    vocab = target.vocab_size
    seqs = [target.new_sequence() for _ in range(max(batch))]
    for i, s in enumerate(seqs):  # distinct contexts, as distinct users
        target.prefill(s, [(7 * i + 13 * j) % vocab for j in range(context)])
    rows = []
    try:
        for b in batch:
            for t in tokens:
                items = [
                    (s, [(3 * i + j) % vocab for j in range(t)], None)
                    for i, s in enumerate(seqs[:b])
                ]
                times = []
                for r in range(repeats + 1):
                    t0 = time.perf_counter()
                    target.forward_batch(items)
                    if r:  # (the first pass of a shape allocates)
                        times.append(time.perf_counter() - t0)
                    for s in seqs[:b]:
                        target.truncate(s, context)
                rows.append((b, t, statistics.median(times)))
                print(f"B={b:2d} T={t:2d}: {rows[-1][2] * 1e3:8.1f} ms", flush=True)
    finally:
        for s in seqs:
            target.free_sequence(s)
    return rows


def main(argv: list[str] | None = None) -> int:
    from specsplit.backends.load import load_backend

    ap = argparse.ArgumentParser(prog="costs", description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--target-backend", default="torch")
    ap.add_argument("--dtype", default=None, choices=DTYPES, help="a torch target's (float32)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", default="1,2,4,8,16")
    ap.add_argument("--tokens", default="1,3,5,9")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_runs/ray_costs")
    ns = ap.parse_args(argv)
    batch = [int(x) for x in ns.batch.split(",")]
    tokens = [int(x) for x in ns.tokens.split(",")]
    doc: dict = {"config": vars(ns), "load_before": os.getloadavg(), "passes": {}}
    for threads in (int(x) for x in ns.threads.split(",")):
        target = load_backend(
            ns.target_backend, ns.target, threads=threads, n_ctx=4096, dtype=ns.dtype
        )
        doc["kv_bytes_per_token"] = target.kv_bytes_per_token()
        model = getattr(target, "model", None)
        if model is not None:
            held = [*model.parameters(), *model.buffers()]  # (packed weights are buffers)
            doc["weight_bytes"] = sum(p.numel() * p.element_size() for p in held)
        rows = measure(target, batch, tokens, ns.context, ns.repeats)
        doc["passes"][str(threads)] = [{"batch": b, "tokens": t, "seconds": s} for b, t, s in rows]
        target.close()
    doc["load_after"] = os.getloadavg()
    doc["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
