"""Failures under load, against `specsplit serve` on loopback (run by hand; each is bounded in
count and time):

    python -m specsplit.bench.reliability kill --kills 50 --out benchmarks/reliability/kill
    python -m specsplit.bench.reliability soak --sessions 64 --minutes 10 \\
        --out benchmarks/reliability/soak
    python -m specsplit.bench.reliability fuzz --messages 10000 --out benchmarks/reliability/fuzz
    python -m specsplit.bench.reliability http --out benchmarks/reliability/http

kill: SIGKILL a server that holds sessions at random moments while edge and cloud-only clients
generate with two servers; texts against references, lost and duplicated tokens, reconnect
times. soak: many sessions for minutes from a few client processes under a KV budget; failed
requests, time between tokens, server RSS against its bound. fuzz: malformed, truncated,
oversized and out-of-range messages made from the .proto's descriptors, each with the status it
must get, while good sessions run. http: the HTTP face under malformed JSON, huge bodies,
invalid parameters and clients that vanish mid-stream; statuses and sessions left open. Results go to --out/results.json; a summary is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from specsplit.bench.reliability.common import QUESTIONS


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m specsplit.bench.reliability", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("kill", "soak", "fuzz", "http"):
        p = sub.add_parser(name)
        p.add_argument("--target", default="smollm2-135m")
        p.add_argument("--target-backend", default="torch")
        p.add_argument("--draft", default="smollm2-135m", help="the edge clients' draft model")
        p.add_argument("--draft-backend", default="llama.cpp")
        p.add_argument("--questions", default=QUESTIONS, help="Spec-Bench question.jsonl")
        p.add_argument("--per-category", type=int, default=2, help="prompts per category")
        p.add_argument("--temperature", type=float, default=0.8, help="of the sampled clients")
        p.add_argument("--k", type=int, default=4, help="fixed K of the sampled clients")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=f"benchmarks/reliability/{name}")
    k = sub.choices["kill"]
    k.add_argument("--kills", type=int, default=50)
    k.add_argument(
        "--edge",
        default="greedy:model,sampled:model,greedy:ngram,sampled:ngram",
        help="edge clients, MODE:DRAFTER (MODE greedy or sampled; DRAFTER model or ngram)",
    )
    k.add_argument("--cloud", default="greedy,sampled", help="cloud-only clients, by mode")
    k.add_argument("--categories", default="", help="Spec-Bench categories (default: all six)")
    k.add_argument("--max-new-tokens", type=int, default=96)
    k.add_argument("--min-gap", type=float, default=1.0, help="seconds, after a restart")
    k.add_argument("--max-gap", type=float, default=8.0)
    k.add_argument("--retry-for", type=float, default=30.0, help="clients' failover window")
    k.add_argument("--max-minutes", type=float, default=None, help="no new kill after it")
    s = sub.choices["soak"]
    s.add_argument("--sessions", type=int, default=64)
    s.add_argument("--minutes", type=float, default=10.0)
    s.add_argument("--processes", type=int, default=4, help="client processes (at most)")
    s.add_argument("--kv-budget", default="256MiB")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples")
    s.add_argument("--categories", default="mt_bench,translation,qa,math_reasoning")
    s.set_defaults(per_category=4)
    f = sub.choices["fuzz"]
    f.add_argument("--messages", type=int, default=10_000)
    f.add_argument("--categories", default="mt_bench,qa")
    f.add_argument("--max-new-tokens", type=int, default=48, help="of the good sessions")
    f.add_argument("--deadline", type=float, default=60.0, help="seconds per fuzz RPC (a hang)")
    f.add_argument("--threads", type=int, default=8, help="fuzz RPCs at once")
    f.add_argument("--max-minutes", type=float, default=None, help="no new case after it")
    h = sub.choices["http"]
    h.add_argument("--rounds", type=int, default=1, help="passes over the one-request cases")
    h.add_argument("--vanish", type=int, default=10, help="vanishing clients of each kind")
    h.add_argument("--max-new-tokens", type=int, default=200, help="of the vanishing clients")
    w = sub.add_parser("_worker", help=argparse.SUPPRESS)  # a soak client process
    w.add_argument("plan")
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    if ns.cmd == "_worker":
        from specsplit.bench.reliability.soak import worker

        return worker(Path(ns.plan))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    if ns.cmd == "kill":
        from specsplit.bench.reliability.kill import cmd_kill as run
    elif ns.cmd == "soak":
        from specsplit.bench.reliability.soak import cmd_soak as run
    elif ns.cmd == "fuzz":
        from specsplit.bench.reliability.fuzz import cmd_fuzz as run
    else:
        from specsplit.bench.reliability.http_face import cmd_http as run
    t0 = time.time()
    doc = run(ns)
    doc["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    doc["wall_seconds"] = time.time() - t0
    path = out / "results.json"
    path.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
