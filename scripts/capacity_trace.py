"""Every round of 8 replaying split clients on one bfloat16 server, as the clients saw it:
when it was sent and answered, its pass's batch size, queue wait and pass time.

    python scripts/capacity_trace.py OUT   # OUT holds recorded_drafts.json (bench.split)
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from specsplit.bench import split as sb
from specsplit.transport import client

EVENTS: list[tuple[int, float, float, int, float, float]] = []
_LOCK = threading.Lock()
_submit = client.RemoteVerifier.submit


def _traced(self, drafts, version, pipelined=False):  # noqa: ANN001, ANN202
    t = time.perf_counter()
    fut = _submit(self, drafts, version, pipelined)

    def done(f, who: int = id(self)) -> None:  # noqa: ANN001
        if f.exception() is None:
            o = f.result()
            with _LOCK:
                EVENTS.append((who, t, time.perf_counter(), o.batch_size, o.t_queue, o.t_verify))

    fut.add_done_callback(done)
    return fut


def main() -> None:
    out = sys.argv[1]
    client.RemoteVerifier.submit = _traced
    ns = argparse.Namespace(
        target="qwen2.5-coder-1.5b", target_backend="torch", dtype="bfloat16",
        draft="qwen2.5-coder-0.5b-iq4_nl", draft_backend="llama.cpp", suite="humaneval",
        questions="../shared/data/spec_bench/question.jsonl", limit=8, max_new_tokens=64,
        out=out, clients=8, k=4,
    )  # fmt: skip
    recs = sb.record_drafts(ns)
    tok = sb.tokenizer_of(ns)
    proc, address, http = sb._server(ns, 8, Path(out) / "server_trace.log")
    try:
        sb._client_run(address, tok, recs[0], 4, 4)  # warm-up
        EVENTS.clear()
        r = sb.replay_clients(address, http, tok, recs, 4, 64)
    finally:
        sb.stop_server(proc)
    print(sb._brief(r))
    EVENTS.sort(key=lambda e: e[1])
    t0 = EVENTS[0][1]
    first = {}
    for e in EVENTS:
        first.setdefault(e[0], len(first))
    for who, ts, td, b, q, v in EVENTS:
        print(
            f"client {first[who]} sent {ts - t0:7.3f} s, answered {td - t0:7.3f} s: batch {b}, "
            f"queued {q * 1e3:5.0f} ms, pass {v * 1e3:5.0f} ms"
        )


if __name__ == "__main__":
    main()
