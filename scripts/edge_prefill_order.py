"""The edge's drafter prefilling its prompt beside the server's or after the first token,
unpinned, with `specsplit serve` (bfloat16 Qwen 1.5B, all cores) on loopback behind a
20 ms proxy: for four HumanEval prompts, three times, alternating which goes first, the
target alone's first token in this process, then the edge's first token and total time
for 32 tokens each way.

    python scripts/edge_prefill_order.py DRAFTS   # a recorded_drafts.json of bench.split
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from specsplit.bench import split as sb
from specsplit.engine.speculative import GenerationRequest


def main() -> None:
    recs = json.loads(Path(sys.argv[1]).read_text())
    ns = argparse.Namespace(target="qwen2.5-coder-1.5b", target_backend="torch", dtype="bfloat16")
    port = sb.free_port()
    log = Path("bench_runs/edge_prefill_order.log")
    log.parent.mkdir(exist_ok=True)
    server = sb.start_server(sb.serve_args(ns), port, log)
    from specsplit.backends.load import load_backend
    from specsplit.engine.speculative import SpeculativeEngine
    from specsplit.faces.api import EdgeDecoder
    from specsplit.transport.netshim import DelayProxy

    ttft: dict[str, list[float]] = {"beside": [], "after": []}
    total: dict[str, list[float]] = {"beside": [], "after": []}
    try:
        target = load_backend("torch", ns.target, n_ctx=4096, dtype="bfloat16")
        draft = load_backend("llama.cpp", "qwen2.5-coder-0.5b-iq4_nl", n_ctx=4096)
        engine = SpeculativeEngine(target)
        px = DelayProxy(("127.0.0.1", port), 0.010).start()
        edge = EdgeDecoder([f"127.0.0.1:{px.port}"], draft, k=None, n_ctx=4096)
        warm = recs[1]["prompt_ids"][:20]
        engine.generate(GenerationRequest(warm, 2))
        edge.engine.generate(GenerationRequest(warm, 4))
        for rep in range(3):
            for rec in recs[:4]:
                ids = rec["prompt_ids"]
                alone = engine.generate(GenerationRequest(ids, 1)).stats.t_first_token
                line = f"{len(ids)} tok: target {alone:.2f}"
                for mode in ("beside", "after") if rep % 2 == 0 else ("after", "beside"):
                    edge.engine.prefill_beside = mode == "beside"
                    st = edge.engine.generate(GenerationRequest(ids, 32)).stats
                    ttft[mode].append(st.t_first_token / alone)
                    total[mode].append(st.t_total)
                    line += f"  {mode} ttft {st.t_first_token:.2f} total {st.t_total:.2f}"
                print(line, flush=True)
        print("median TTFT / target:", {k: round(statistics.median(v), 3) for k, v in ttft.items()})
        print(
            "median total (32 tokens):",
            {k: round(statistics.median(v), 2) for k, v in total.items()},
        )
        edge.close()
        px.stop()
    finally:
        sb.stop_server(server)


if __name__ == "__main__":
    main()
