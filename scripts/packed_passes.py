"""Whole target passes with packed linears (backends/torch_packed.py) against PyTorch's own,
in one process, alternating: a prompt's prefill, and batched passes of B sessions x T tokens
at a 256-token context. Median milliseconds of 5 after one untimed.

    python scripts/packed_passes.py [--target qwen2.5-coder-1.5b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

from specsplit.backends import torch_backend
from specsplit.backends.torch_backend import TorchBackend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args()
    packed = TorchBackend.load(ns.target, dtype=ns.dtype, threads=ns.threads, n_ctx=4096)
    can_pack = torch_backend.can_pack
    torch_backend.can_pack = lambda *a: False
    plain = TorchBackend.load(ns.target, dtype=ns.dtype, threads=ns.threads, n_ctx=4096)
    torch_backend.can_pack = can_pack
    vocab = plain.vocab_size
    shapes = [("prefill", 1, 512), *((f"B={b} T={t}", b, t) for b in (1, 8) for t in (1, 5, 13))]
    times: dict[tuple[str, str], list[float]] = {}
    seqs = {}
    for name, b in (("plain", plain), ("packed", packed)):
        seqs[name] = [b.new_sequence() for _ in range(8)]
        for i, s in enumerate(seqs[name]):
            b.prefill(s, [(7 * i + 13 * j) % vocab for j in range(256)])
    for rep in range(6):
        for label, nb, nt in shapes:
            for name, b in (("plain", plain), ("packed", packed)):
                ss = seqs[name][:nb]
                t0 = time.perf_counter()
                if label == "prefill":
                    s = b.new_sequence()
                    b.prefill(s, [(11 * j) % vocab for j in range(nt)])
                    b.free_sequence(s)
                else:
                    b.forward_batch(
                        [
                            (s, [(3 * i + j) % vocab for j in range(nt)], None)
                            for i, s in enumerate(ss)
                        ]
                    )
                if rep:
                    times.setdefault((label, name), []).append(time.perf_counter() - t0)
                for s in ss:
                    b.truncate(s, 256)
    print(f"{ns.target} {ns.dtype}, {ns.threads} threads: median ms (plain -> packed)")
    for label, _, _ in shapes:
        a = statistics.median(times[(label, "plain")]) * 1e3
        p = statistics.median(times[(label, "packed")]) * 1e3
        print(f"{label:>12}: {a:8.1f} -> {p:8.1f}  ({a / p:.2f}x)")


if __name__ == "__main__":
    main()
