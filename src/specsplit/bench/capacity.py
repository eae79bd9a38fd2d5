"""The capacity model of docs/scaling.md: how many verification replicas serve N concurrent
edge sessions at a per-user token rate, split (edge drafts, the server verifies) against
cloud-only (the server decodes every token), on this CPU from measured pass costs and on a GPU
from a roofline with stated assumptions.

    python -m specsplit.bench.capacity --costs benchmarks/ray_costs/results.json \\
        --report benchmarks/report/results_torch.json --out benchmarks/capacity

A session's round: the edge drafts K tokens (K x t_draft), sends them (one RTT), the replica
verifies them with the other sessions of its batch in one pass t(B, K + 1), and E(K) tokens
come back (E(K) = 1 + a1 + a1 a2 + ... from the measured per-position acceptance). With N
sessions on a replica and a batch limit B_max, every pass carries min(N, B_max) rounds, so a
session waits ceil(N / B_max) passes per round when the replica is the bottleneck:

    per-user tokens/s = E(K) / max(t_edge + t(b, K + 1), ceil(N / B_max) * t(b, K + 1))

with b = min(N, B_max) and t_edge = RTT + K t_draft. Cloud-only has K = 0, E = 1, no RTT per
token (the stream carries each token as it comes). Sessions per replica: the largest N whose
per-user rate is at least the goal, and whose KV cache (N x context x KV bytes per token)
fits the replica's memory beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

# ---- a GPU by roofline: assumptions, each with its source --------------------------------
# NVIDIA A100 80GB SXM: 2,039 GB/s HBM2e, 312 TFLOPS BF16 dense (NVIDIA A100 datasheet,
# nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf). Qwen2.5-1.5B: 1.54 B parameters,
# 28 layers, 2 KV heads x 128 dims (the model's config.json); BF16 weights and KV cache.
GPU = {
    "name": "A100 80GB SXM (roofline)",
    "bandwidth": 2.039e12,  # bytes/s
    "flops": 312e12,  # BF16 dense
    "memory": 80e9,
    # assumed, not measured: achieved fractions of the peaks for small-batch decoding kernels
    "bandwidth_efficiency": 0.6,
    "flops_efficiency": 0.5,
}
QWEN_15B = {"params": 1.54e9, "kv_bytes_bf16": 28 * 2 * 2 * 128 * 2}


@dataclass(frozen=True)
class Workload:
    sessions: int = 10_000
    context: int = 1_000  # tokens each session holds (prompt + output)
    rate: float = 2.0  # the goal: tokens/s per user
    rtt: float = 0.02  # s
    t_draft: float = 0.018  # s per draft token at the edge (0.5B Q4 on llama.cpp, models.md)
    k: int = 4


class PassCost:
    """t(B, n): seconds of one batched pass over n new tokens in each of B sessions."""

    def __init__(self, rows: list[dict] | None = None, gpu: dict | None = None) -> None:
        self.rows, self.gpu = rows or [], gpu

    def __call__(self, b: int, n: int, context: int) -> float:
        if self.gpu is not None:
            g, m = self.gpu, QWEN_15B
            read = 2 * m["params"] + b * context * m["kv_bytes_bf16"]  # weights + KV, bytes
            flops = 2 * m["params"] * b * n
            return max(
                read / (g["bandwidth"] * g["bandwidth_efficiency"]),
                flops / (g["flops"] * g["flops_efficiency"]),
            )
        return self._measured(b, n)

    def _measured(self, b: int, n: int) -> float:
        """Linear in B between measured batch sizes (and beyond the largest, by its slope),
        at the measured token count nearest n."""
        ns = sorted({r["tokens"] for r in self.rows})
        near = min(ns, key=lambda x: abs(x - n))
        pts = sorted((r["batch"], r["seconds"]) for r in self.rows if r["tokens"] == near)
        for (b0, t0), (b1, t1) in zip(pts, pts[1:], strict=False):
            if b <= b1:
                return t0 + (t1 - t0) * (b - b0) / (b1 - b0) if b >= b0 else t0
        (b0, t0), (b1, t1) = pts[-2], pts[-1]
        return t1 + (t1 - t0) * (b - b1) / (b1 - b0)


def expected_tokens(acceptance: list[float], k: int) -> float:
    """E(K) = 1 + sum over i <= K of a1 a2 ... ai (a: per-position acceptance, conditional)."""
    e, run = 1.0, 1.0
    for a in acceptance[:k]:
        run *= a
        e += run
    return e


def per_user_rate(cost: PassCost, w: Workload, n: int, b_max: int, tau: float, k: int) -> float:
    b = min(n, b_max)
    t_pass = cost(b, k + 1, w.context)
    t_edge = (w.rtt + k * w.t_draft) if k else 0.0
    return tau / max(t_edge + t_pass, math.ceil(n / b_max) * t_pass)


def sessions_per_replica(
    cost: PassCost, w: Workload, b_max: int, tau: float, k: int, kv_room: float, kv_token: float
) -> tuple[int, str]:
    """The most sessions one replica holds at the goal rate, and what stops it there."""
    by_memory = int(kv_room // (w.context * kv_token))
    n = 0
    while n < by_memory and per_user_rate(cost, w, n + 1, b_max, tau, k) >= w.rate:
        n += 1
    return n, "KV memory" if n == by_memory else "compute"


def plan(cost: PassCost, w: Workload, tau: float, kv_room: float, kv_token: float) -> dict:
    """Replicas for w.sessions, split against cloud-only, at several batch limits."""
    out = {}
    for b_max in (1, 4, 8, 16, 64, 256):
        row = {}
        for mode, k, e in (("split", w.k, tau), ("cloud-only", 0, 1.0)):
            n, limit = sessions_per_replica(cost, w, b_max, e, k, kv_room, kv_token)
            row[mode] = {
                "sessions_per_replica": n,
                "limited_by": limit,
                "replicas": math.ceil(w.sessions / n) if n else None,
                "rate_at_one_session": per_user_rate(cost, w, 1, b_max, e, k),
            }
        out[str(b_max)] = row
    return out


def round_math_ms(vocab: int = 151_936, k: int = 4, repeats: int = 12) -> dict[str, float]:
    """CPU milliseconds of one round's verification math for one session (NumPy, as the
    server runs it): sampled (T 0.8, top-p 0.95: p for K + 1 rows, q for K, the rejection
    test) and greedy (argmax of K + 1 rows); medians."""
    import time

    import numpy as np

    from specsplit.randomness import Sequential
    from specsplit.sampling import SamplingParams, logits_to_probs
    from specsplit.verify import verify_chain

    logits = np.random.default_rng(0).normal(0, 3, (k + 1, vocab)).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_p=0.95)
    sampled, greedy = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        p = np.stack([logits_to_probs(row, params) for row in logits])  # [K + 1, V]
        q = p[:k]
        verify_chain([int(np.argmax(q[i])) for i in range(k)], q, p, Sequential(r))
        t1 = time.perf_counter()
        np.argmax(logits, axis=-1)
        greedy.append(time.perf_counter() - t1)
        sampled.append(t1 - t0)
    return {
        "sampled": 1e3 * sorted(sampled)[repeats // 2],
        "greedy": 1e3 * sorted(greedy)[repeats // 2],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specsplit.bench.capacity", description=__doc__)
    ap.add_argument("--costs", required=True, help="results.json of specsplit.bench.costs")
    ap.add_argument("--threads", default="1", help="which measured thread count (one replica)")
    ap.add_argument("--report", required=True, help="a report run: per-position acceptance")
    ap.add_argument("--system", default="spec[qwen2.5-coder-0.5b-iq4_nl]")
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--context", type=int, default=1_000)
    ap.add_argument("--rates", default="0.5,1,2", help="CPU goals, tokens/s per user")
    ap.add_argument("--gpu-rates", default="10,20,30")
    ap.add_argument("--cpu-memory", type=float, default=24e9, help="bytes per CPU replica host")
    ap.add_argument("--out", default="benchmarks/capacity")
    ns = ap.parse_args(argv)
    costs = json.loads(Path(ns.costs).read_text())
    report = json.loads(Path(ns.report).read_text())
    acc = report["summary"]["overall"][ns.system]["per_position_acceptance"]
    doc: dict = {"config": vars(ns), "acceptance": acc[:8], "gpu": GPU, "model": QWEN_15B}
    tau = {k: expected_tokens(acc, k) for k in (2, 4, 8)}
    doc["expected_tokens"] = tau
    cpu = PassCost(costs["passes"][ns.threads])
    kv_cpu, weights = costs["kv_bytes_per_token"], costs["weight_bytes"]
    doc["cpu"] = {
        str(r): plan(
            cpu, Workload(ns.sessions, ns.context, r), tau[4], ns.cpu_memory - weights, kv_cpu
        )
        for r in (float(x) for x in ns.rates.split(","))
    }
    gpu = PassCost(gpu=GPU)
    room = GPU["memory"] - 2 * QWEN_15B["params"]
    doc["gpu_plan"] = {
        str(r): plan(
            gpu, Workload(ns.sessions, ns.context, r), tau[4], room, QWEN_15B["kv_bytes_bf16"]
        )
        for r in (float(x) for x in ns.gpu_rates.split(","))
    }
    doc["gpu_pass_ms"] = {
        f"B={b},n={n}": 1e3 * gpu(b, n, ns.context) for b in (1, 16, 64, 256) for n in (1, 5)
    }
    doc["round_math_ms"] = round_math_ms()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    for where, plans in (("CPU", doc["cpu"]), ("GPU", doc["gpu_plan"])):
        for rate, rows in plans.items():
            for b_max, row in rows.items():
                s, c = row["split"], row["cloud-only"]
                print(
                    f"{where} {rate} tok/s/user, batch<= {b_max}: split {s['sessions_per_replica']}"
                    f"/replica ({s['limited_by']}) -> {s['replicas']} replicas; cloud-only "
                    f"{c['sessions_per_replica']} ({c['limited_by']}) -> {c['replicas']}"
                )
    print(f"verification math per session round (ms): {doc['round_math_ms']}")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
