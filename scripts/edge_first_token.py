"""The edge's first token against the server's open alone: a 1-thread bfloat16 server on
core 0, this process on core 1 behind a 20 ms round-trip proxy; for two HumanEval prompts,
twice, the first-token time of an EdgeDecoder (IQ4_NL drafter prefilling beside the server)
and of a cloud-only ``Generate`` (no drafter).

    python scripts/edge_first_token.py DRAFTS   # a recorded_drafts.json of bench.split
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from specsplit.bench import split as sb
from specsplit.engine.speculative import GenerationRequest


def main() -> None:
    recs = json.loads(Path(sys.argv[1]).read_text())
    ns = argparse.Namespace(
        target="qwen2.5-coder-1.5b", target_backend="torch", dtype="bfloat16",
        draft="qwen2.5-coder-0.5b-iq4_nl", draft_backend="llama.cpp",
    )  # fmt: skip
    port = sb.free_port()
    log = Path("bench_runs/edge_first_token.log")
    log.parent.mkdir(exist_ok=True)
    args = sb.serve_args(ns, "--threads", "1")
    server = sb.start_server(args, port, log, prefix=["taskset", "-c", "0"])
    os.sched_setaffinity(0, {1})
    from specsplit.backends.load import load_backend
    from specsplit.faces.api import EdgeDecoder
    from specsplit.transport.client import generate_cloud
    from specsplit.transport.netshim import DelayProxy

    try:
        draft = load_backend("llama.cpp", ns.draft, n_ctx=4096, threads=1)
        px = DelayProxy(("127.0.0.1", port), 0.010).start()
        address = f"127.0.0.1:{px.port}"
        edge = EdgeDecoder([address], draft, k=None, n_ctx=4096)
        edge.engine.generate(GenerationRequest(recs[1]["prompt_ids"][:20], 4))  # warm-up
        for _ in range(2):
            for rec in (recs[0], recs[2]):
                ids = rec["prompt_ids"]
                res = edge.engine.generate(GenerationRequest(ids, 8))
                t0 = time.perf_counter()
                chunks = iter(
                    generate_cloud(
                        address, draft.tokenizer.fingerprint(), prompt_ids=ids, max_new_tokens=2
                    )
                )
                next(chunks)
                cloud = time.perf_counter() - t0
                list(chunks)
                print(
                    f"{len(ids)} prompt tokens: edge first token {res.stats.t_first_token:.2f} s, "
                    f"cloud-only {cloud:.2f} s",
                    flush=True,
                )
        edge.close()
        px.stop()
    finally:
        sb.stop_server(server)


if __name__ == "__main__":
    main()
