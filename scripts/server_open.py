"""A server's open against a local prefill, unpinned on this machine: `specsplit serve`
(bfloat16 Qwen 1.5B, all cores) on loopback and the same target in this process; for four
HumanEval prompts, three times, the first token of the target alone (before and after),
of a cloud-only open direct, through a 20 ms proxy, and direct after a 1 s pause.

    python scripts/server_open.py DRAFTS   # a recorded_drafts.json of bench.split
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from specsplit.bench import split as sb
from specsplit.engine.speculative import GenerationRequest


def main() -> None:
    recs = json.loads(Path(sys.argv[1]).read_text())
    ns = argparse.Namespace(target="qwen2.5-coder-1.5b", target_backend="torch", dtype="bfloat16")
    port = sb.free_port()
    log = Path("bench_runs/server_open.log")
    log.parent.mkdir(exist_ok=True)
    server = sb.start_server(sb.serve_args(ns), port, log)
    from specsplit.backends.load import load_backend
    from specsplit.engine.speculative import SpeculativeEngine
    from specsplit.transport.client import generate_cloud
    from specsplit.transport.netshim import DelayProxy

    try:
        target = load_backend("torch", ns.target, n_ctx=4096, dtype="bfloat16")
        engine, fp = SpeculativeEngine(target), target.tokenizer.fingerprint()
        px = DelayProxy(("127.0.0.1", port), 0.010).start()

        def cloud(address: str, ids: list[int]) -> float:
            t0 = time.perf_counter()
            chunks = iter(generate_cloud(address, fp, prompt_ids=ids, max_new_tokens=2))
            next(chunks)
            t = time.perf_counter() - t0
            list(chunks)
            return t

        def local(ids: list[int]) -> float:
            return engine.generate(GenerationRequest(ids, 1)).stats.t_first_token

        warm = recs[1]["prompt_ids"][:20]
        local(warm)
        cloud(f"127.0.0.1:{port}", warm)
        ratios: dict[str, list[float]] = {"direct": [], "proxied": [], "after a pause": []}
        for _ in range(3):
            for rec in recs[:4]:
                ids = rec["prompt_ids"]
                before = local(ids)
                got = [cloud(f"127.0.0.1:{port}", ids), cloud(f"127.0.0.1:{px.port}", ids)]
                time.sleep(1.0)
                got.append(cloud(f"127.0.0.1:{port}", ids))
                after = local(ids)
                for k, v in zip(ratios, got, strict=True):
                    ratios[k].append(v / ((before + after) / 2))
                print(
                    f"{len(ids)} prompt tokens: target alone {before:.2f} / {after:.2f} s, "
                    f"server open direct {got[0]:.2f}, proxied {got[1]:.2f}, "
                    f"after a pause {got[2]:.2f} s",
                    flush=True,
                )
        print(
            "median open / target alone: "
            + ", ".join(f"{k} {statistics.median(v):.2f}x" for k, v in ratios.items())
        )
        px.stop()
    finally:
        sb.stop_server(server)


if __name__ == "__main__":
    main()
