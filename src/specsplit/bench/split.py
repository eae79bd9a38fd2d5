"""Benchmarks of the split system: round-trip times, server capacity, server memory.

    python -m specsplit.bench.split rtt --limit 5 --rtt 0,20,80
    python -m specsplit.bench.split throughput --users 1,2,4,8 --batch 8,1
    python -m specsplit.bench.split memory --sessions 100 --kv-budget 256MiB

The server runs in its own process (``specsplit serve``); round-trip times are emulated by a
delaying TCP proxy (``transport.netshim``), which also counts the bytes on the wire.
Results go to ``--out`` as JSON; the summary is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specsplit.backends.load import DTYPES
from specsplit.proposers.base import Draft, Proposer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: Sequence[str], port: int, log: Path, prefix: Sequence[str] = ()
) -> subprocess.Popen:
    """``specsplit serve`` in a subprocess (after ``prefix``, e.g. taskset); returns once it
    listens."""
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "specsplit.faces.cli",
        "serve",
        "--port",
        str(port),
        *args,
    ]
    f = open(log, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stderr=f, stdout=f)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: see {log}")
        if "specsplit serving" in log.read_text():
            return proc
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start in 600 s")


def serve_args(ns: argparse.Namespace, *extra: str) -> list[str]:
    """`specsplit serve` flags for the benchmark's target, no rate limit, then extra."""
    dtype = ["--dtype", ns.dtype] if getattr(ns, "dtype", None) else []
    return [
        "--target",
        ns.target,
        "--target-backend",
        ns.target_backend,
        *dtype,
        "--rate",
        "0",
        *extra,
    ]


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            fields[k] = int(v.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def chat_ids(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    """The prompt as a chat turn where the model has a chat template, else the plain text."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    if rendered is None:
        return tokenizer.encode(text)
    return tokenizer.encode(rendered, add_special=False)


def prompts_of(ns: argparse.Namespace) -> list:
    from specsplit.bench.prompts import load_humaneval, load_spec_bench

    if ns.suite == "humaneval":
        return load_humaneval(ns.limit)
    return load_spec_bench(ns.questions, None, ns.limit)


# ---- rtt: edge-cloud speculation vs cloud-only vs the target alone ----


def cmd_rtt(ns: argparse.Namespace) -> dict:
    from specsplit.backends.load import load_backend
    from specsplit.engine.speculative import GenerationRequest, SpeculativeEngine
    from specsplit.faces.api import EdgeDecoder
    from specsplit.proposers.draft_model import DraftModelProposer
    from specsplit.sampling import SamplingParams
    from specsplit.transport.client import generate_cloud
    from specsplit.transport.netshim import DelayProxy

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    threads = 1 if ns.pin else None  # --pin: server on core 0, this process on core 1
    server = start_server(
        serve_args(ns, *(["--threads", "1"] if ns.pin else [])),
        port,
        out / "server.log",
        prefix=["taskset", "-c", "0"] if ns.pin else (),
    )
    if ns.pin:
        os.sched_setaffinity(0, {1})
    try:
        target = load_backend(
            ns.target_backend, ns.target, n_ctx=4096, threads=threads, dtype=ns.dtype
        )
        draft = load_backend(ns.draft_backend, ns.draft, n_ctx=4096, threads=threads)
        local = SpeculativeEngine(target)
        spec = SpeculativeEngine(target, [DraftModelProposer(draft)])  # specsplit local
        spec.warm_up()
        rtts = [float(x) for x in ns.rtt.split(",")]
        proxies = {r: DelayProxy(("127.0.0.1", port), r / 2000).start() for r in rtts}
        edges = {
            r: EdgeDecoder([f"127.0.0.1:{proxies[r].port}"], draft, k=None, n_ctx=4096)
            for r in rtts
        }
        no_ahead = {}
        if ns.compare_ahead:  # the same edge without drafting ahead
            for r in rtts:
                no_ahead[r] = EdgeDecoder([f"127.0.0.1:{proxies[r].port}"], draft, n_ctx=4096)
                no_ahead[r].engine.pipeline = False
        fp = target.tokenizer.fingerprint()
        prompts = prompts_of(ns)
        warm = chat_ids(target.tokenizer, "Say hi.")
        local.generate(GenerationRequest(warm, 4))
        for r in rtts:
            edges[r].engine.generate(GenerationRequest(warm, 8))
            if r in no_ahead:
                no_ahead[r].engine.generate(GenerationRequest(warm, 8))
            if ns.no_cloud:
                continue
            list(
                generate_cloud(
                    f"127.0.0.1:{proxies[r].port}", fp, prompt_ids=warm, max_new_tokens=4
                )
            )
        records = []
        for i, p in enumerate(prompts):
            ids = chat_ids(target.tokenizer, p.text)
            params = SamplingParams(temperature=ns.temperature)
            req = GenerationRequest(ids, ns.max_new_tokens, params, seed=i)
            rec: dict = {"id": p.id, "prompt_tokens": len(ids), "results": {}}
            t0 = time.perf_counter()
            ref = local.generate(req)
            rec["results"]["target"] = {
                "tokens_per_s": ref.stats.tokens_per_s,
                "new_tokens": ref.stats.new_tokens,
                "ttft_s": ref.stats.t_first_token,
                "wall_s": time.perf_counter() - t0,
            }
            res = spec.generate(req)
            rec["results"]["local"] = {
                **res.stats.as_dict(rounds=False),
                "greedy_equal": res.token_ids == ref.token_ids if params.greedy else None,
            }
            for r in rtts:
                px = proxies[r]
                if not ns.no_cloud:
                    c = _cloud_run(px, fp, ids, ns, params, i)
                    got = c.pop("token_ids")
                    c["greedy_equal"] = got == ref.token_ids if params.greedy else None
                    rec["results"][f"cloud-only@{r:g}ms"] = c
                for name, dec in (
                    (f"edge@{r:g}ms", edges[r]),
                    (f"edge-no-ahead@{r:g}ms", no_ahead.get(r)),
                ):
                    if dec is None:
                        continue
                    px.reset_counters()
                    res = dec.engine.generate(req)
                    st = res.stats
                    rec["results"][name] = {
                        **st.as_dict(rounds=False),
                        "wire_bytes_up": px.bytes_up,
                        "wire_bytes_down": px.bytes_down,
                        "wire_bytes_per_token": (px.bytes_up + px.bytes_down)
                        / max(1, st.new_tokens),
                        "greedy_equal": res.token_ids == ref.token_ids if params.greedy else None,
                    }
            records.append(rec)
            print(f"[{i + 1}/{len(prompts)}] " + _line(rec), flush=True)
        for e in [*edges.values(), *no_ahead.values()]:
            e.close()
        for px in proxies.values():
            px.stop()
    finally:
        stop_server(server)
    systems = list(records[0]["results"])
    summary = {}
    for s in systems:
        tps = [r["results"][s]["tokens_per_s"] for r in records]
        ratio = [
            r["results"][s]["tokens_per_s"] / r["results"]["target"]["tokens_per_s"]
            for r in records
        ]
        summary[s] = {
            "median_tokens_per_s": statistics.median(tps),
            "median_speedup_vs_target": statistics.median(ratio),
            "median_wire_bytes_per_token": _med(records, s, "wire_bytes_per_token"),
            "median_acceptance_rate": _med(records, s, "acceptance_rate"),
            "greedy_equal": all(r["results"][s].get("greedy_equal") is not False for r in records),
        }
    return {"config": _config(ns), "summary": summary, "prompts": records}


def _cloud_run(px, fp: str, ids: list[int], ns: argparse.Namespace, params, seed: int) -> dict:  # noqa: ANN001
    """Cloud-only through the proxy: the server generates alone and streams."""
    from specsplit.transport.client import generate_cloud

    px.reset_counters()
    t0 = time.perf_counter()
    chunks = list(
        generate_cloud(
            f"127.0.0.1:{px.port}",
            fp,
            prompt_ids=ids,
            max_new_tokens=ns.max_new_tokens,
            params=params,
            seed=seed,
        )
    )
    wall = time.perf_counter() - t0
    got = [t for c in chunks for t in c.token_ids]
    return {
        "tokens_per_s": len(got) / wall,
        "new_tokens": len(got),
        "wire_bytes_per_token": (px.bytes_up + px.bytes_down) / max(1, len(got)),
        "token_ids": got,
    }


def _med(records: list[dict], system: str, key: str) -> float | None:
    xs = [r["results"][system][key] for r in records if key in r["results"][system]]
    return statistics.median(xs) if xs else None


def _line(rec: dict) -> str:
    base = rec["results"]["target"]["tokens_per_s"]
    return "  ".join(
        f"{s} {r['tokens_per_s']:.2f} tok/s ({r['tokens_per_s'] / base:.2f}x)"
        for s, r in rec["results"].items()
    )


def _config(ns: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(ns).items() if k != "func"}


# ---- throughput: N replaying clients, batching on vs batch size 1 ----


class RecordingProposer(Proposer):
    """Wraps a drafter and records its drafts by the context they were made for."""

    def __init__(self, inner: Proposer) -> None:
        self.inner, self.name = inner, inner.name
        self.drafts: dict[int, list[int]] = {}

    def propose(self, context, k, params, u) -> Draft:  # noqa: ANN001
        d = self.inner.propose(context, k, params, u)
        self.drafts[len(context)] = list(d.tokens)
        return d


class ReplayProposer(Proposer):
    """Sends the drafts recorded for a prompt (no model: the client costs no CPU). Where the
    text moves off the recording (a near tie decided otherwise in a batched pass), the
    ``off_recording`` drafter drafts instead, as the user's own drafter would; without one,
    plain decoding."""

    name = "replay"

    def __init__(
        self, drafts: dict[int, list[int]], text: list[int], off_recording: Proposer | None = None
    ) -> None:
        self.drafts, self.text = drafts, text  # text: the recorded committed ids
        self.off_recording = off_recording
        self.off_rounds = 0  # rounds drafted off the recording

    def propose(self, context, k, params, u) -> Draft:  # noqa: ANN001
        n = len(context)
        if list(context) == self.text[:n]:
            return Draft(self.drafts.get(n, [])[:k])
        if self.off_recording is None:
            return Draft([])
        self.off_rounds += 1
        return self.off_recording.propose(context, k, params, u)


class SharedDrafter(Proposer):
    """One draft model for every replaying client whose text left its recording (rare: one
    of 8 at most in the runs so far), loaded on first use, one thread, one call at a time
    (it re-synchronises its cache with each caller's text by common prefix)."""

    name = "shared-draft"

    def __init__(self, backend: str, model: str) -> None:
        self.backend, self.model = backend, model
        self._lock = threading.Lock()
        self._inner: Proposer | None = None

    def propose(self, context, k, params, u) -> Draft:  # noqa: ANN001
        with self._lock:
            if self._inner is None:
                from specsplit.backends.load import load_backend
                from specsplit.proposers.draft_model import DraftModelProposer

                self._inner = DraftModelProposer(
                    load_backend(self.backend, self.model, n_ctx=4096, threads=1)
                )
            return self._inner.propose(context, k, params, u)


def record_drafts(ns: argparse.Namespace) -> list[dict]:
    """Greedy speculative runs on this machine, keeping every draft (cached in --out)."""
    from specsplit.backends.load import load_backend
    from specsplit.engine.speculative import GenerationRequest, SpeculativeEngine
    from specsplit.proposers.draft_model import DraftModelProposer

    path = Path(ns.out) / "recorded_drafts.json"
    if path.exists():
        return json.loads(path.read_text())
    target = load_backend(ns.target_backend, ns.target, n_ctx=4096, dtype=ns.dtype)
    draft = DraftModelProposer(load_backend(ns.draft_backend, ns.draft, n_ctx=4096))
    prompts = prompts_of(ns)[: ns.clients]
    out = []
    for p in prompts:
        ids = chat_ids(target.tokenizer, p.text)
        rec = RecordingProposer(draft)
        res = SpeculativeEngine(target, [rec], k=ns.k).generate(
            GenerationRequest(ids, ns.max_new_tokens)
        )
        out.append(
            {
                "prompt_ids": ids,
                "output_ids": res.token_ids,
                "drafts": {str(n): d for n, d in rec.drafts.items()},
            }
        )
        print(
            f"recorded {p.id}: {res.stats.new_tokens} tokens, acceptance {res.stats.acceptance_rate:.2f}",
            flush=True,
        )
    target.close()
    path.write_text(json.dumps(out))
    return out


def _client_run(
    address: str,
    tokenizer,  # noqa: ANN001
    rec: dict,
    k: int,
    max_new: int,
    off_recording: Proposer | None = None,
) -> dict:
    """One edge client replaying a recorded prompt's drafts (split: the server only verifies;
    ``off_recording`` drafts where the text leaves the recording)."""
    from specsplit.engine.draft_length import FixedK
    from specsplit.engine.speculative import DecodeLoop, GenerationRequest
    from specsplit.transport.client import RemoteVerifier

    drafts = {int(n): d for n, d in rec["drafts"].items()}
    prop = ReplayProposer(drafts, rec["prompt_ids"] + rec["output_ids"], off_recording)
    verifier = RemoteVerifier([address], tokenizer)
    loop = DecodeLoop(verifier, [prop], FixedK(k), pipeline=False)
    try:
        out = _timed(loop.stream(GenerationRequest(rec["prompt_ids"], max_new)), rec)
        out["off_recording_rounds"] = prop.off_rounds
        return out
    finally:
        verifier.shutdown()


def _cloud_client_run(address: str, tokenizer, rec: dict, max_new: int) -> dict:  # noqa: ANN001
    """One cloud-only client: ``Generate`` without a server drafter, greedy (the server
    generates every token, one target pass per token, through the same scheduler)."""
    from specsplit.sampling import SamplingParams
    from specsplit.transport.client import generate_cloud

    chunks = generate_cloud(
        address,
        tokenizer.fingerprint(),
        prompt_ids=rec["prompt_ids"],
        max_new_tokens=max_new,
        params=SamplingParams(),
        seed=0,
    )
    return _timed(chunks, rec)


def _timed(chunks, rec: dict) -> dict:  # noqa: ANN001 - an iterator of Chunk
    """Drain a client's stream of chunks, timing each: end-to-end figures of one user."""
    t0 = time.perf_counter()
    stamps, counts, clock = [], [], []
    result = None
    for chunk in chunks:
        clock.append(time.perf_counter())
        stamps.append(clock[-1] - t0)
        counts.append(len(chunk.token_ids) + (chunk.result is not None and not chunk.token_ids))
        result = chunk.result or result
    gaps = []  # per token: the wait for the chunk it came in, shared by the chunk's tokens
    for i in range(1, len(stamps)):
        gaps += [(stamps[i] - stamps[i - 1]) / max(1, counts[i])] * max(1, counts[i])
    n = result.stats.new_tokens
    return {
        "new_tokens": n,
        "ttft_s": stamps[0] if stamps else None,
        "total_s": stamps[-1] if stamps else None,
        "tokens_per_s": n / stamps[-1] if stamps and stamps[-1] > 0 else None,  # end to end
        "tbt_s": gaps,
        "chunks": list(zip(clock, counts)),  # (perf_counter time, tokens) of each chunk
        "target_passes": result.stats.target_passes,
        "greedy_equal": result.token_ids == rec["output_ids"],
    }


def tokenizer_of(ns: argparse.Namespace):  # noqa: ANN201
    """The target's tokenizer: from its GGUF without the weights where it has one, else from
    the model (a transformers folder or hub id)."""
    from specsplit.backends.load import load_backend
    from specsplit.faces.api import load_tokenizer
    from specsplit.registry import MODELS

    if ns.target in MODELS or ns.target.endswith(".gguf"):
        return load_tokenizer(ns.target)
    target = load_backend(ns.target_backend, ns.target, dtype=ns.dtype)
    target.close()
    return target.tokenizer


def _server(ns: argparse.Namespace, max_batch: int, log: Path) -> tuple[subprocess.Popen, str, int]:
    """A `specsplit serve` with this max batch: (process, gRPC address, HTTP port)."""
    port, http_port = free_port(), free_port()
    flags = ("--max-batch", str(max_batch), "--max-sessions", str(2 * ns.clients))
    proc = start_server(serve_args(ns, *flags, "--http-port", str(http_port)), port, log)
    return proc, f"127.0.0.1:{port}", http_port


def cmd_throughput(ns: argparse.Namespace) -> dict:
    """Server capacity: 1, 2, 4, 8 concurrent users on one server, split (edge clients
    replaying recorded drafts; the server verifies) against cloud-only (the server generates,
    ``Generate`` without a server drafter), interleaved at each count; then batching on
    against the other ``--batch`` sizes with ``--clients`` split users."""
    recs = record_drafts(ns)
    tokenizer = tokenizer_of(ns)
    out = Path(ns.out)
    batches = [int(x) for x in ns.batch.split(",")]
    users = sorted({int(x) for x in ns.users.split(",")} | {ns.clients})
    off = SharedDrafter(ns.draft_backend, ns.draft)  # a text that leaves its recording
    modes = {
        "split": lambda a, h, n: replay_clients(
            a, h, tokenizer, recs[:n], ns.k, ns.max_new_tokens, off_recording=off
        ),
        "cloud_only": lambda a, h, n: cloud_clients(a, h, tokenizer, recs[:n], ns.max_new_tokens),
    }
    rows, batching = [], {}
    proc, address, http_port = _server(ns, batches[0], out / f"server_batch{batches[0]}.log")
    try:
        _client_run(address, tokenizer, recs[0], ns.k, 4)  # warm-up
        _cloud_client_run(address, tokenizer, recs[0], 4)
        for i, n in enumerate(users):
            row: dict = {"users": n}
            for mode in list(modes)[:: 1 if i % 2 == 0 else -1]:  # interleaved
                row[mode] = modes[mode](address, http_port, n)
                print(f"{n} users, {mode}: {_brief(row[mode])}", flush=True)
            row.update(_ratios(row["split"], row["cloud_only"]))
            rows.append(row)
        batching[f"max_batch={batches[0]}"] = next(r for r in rows if r["users"] == ns.clients)[
            "split"
        ]
    finally:
        stop_server(proc)
    for max_batch in batches[1:]:
        proc, address, http_port = _server(ns, max_batch, out / f"server_batch{max_batch}.log")
        try:
            _client_run(address, tokenizer, recs[0], ns.k, 4)  # warm-up
            batching[f"max_batch={max_batch}"] = modes["split"](address, http_port, ns.clients)
        finally:
            stop_server(proc)
        print(f"max_batch={max_batch}: {_brief(batching[f'max_batch={max_batch}'])}", flush=True)
    return {"config": _config(ns), "results": _capacity_results(rows, batching, batches, ns)}


def _ratios(split: dict, cloud: dict) -> dict:
    """Split against cloud-only, and the most split could gain end to end: both prefill the
    same prompts on the server, so with decoding free split's wall would still be its time
    until every user had a first token (Amdahl's bound)."""
    return {
        "split_over_cloud_only": split["server_tokens_per_s"] / cloud["server_tokens_per_s"],
        "per_user_split_over_cloud_only": (
            split["median_user_tokens_per_s"] / cloud["median_user_tokens_per_s"]
        ),
        "split_over_cloud_only_bound": cloud["wall_s"] / split["all_first_tokens_s"],
    }


def _capacity_results(rows: list[dict], batching: dict, batches: list[int], ns) -> dict:  # noqa: ANN001
    out: dict = {
        "users": rows,
        "split_over_cloud_only": {str(r["users"]): r["split_over_cloud_only"] for r in rows},
        "per_user_split_over_cloud_only": {
            str(r["users"]): r["per_user_split_over_cloud_only"] for r in rows
        },
        "batching": {"clients": ns.clients, **batching},
    }
    on = batching[f"max_batch={batches[0]}"]
    for b in batches[1:]:
        off = batching[f"max_batch={b}"]
        out["batching"][f"ratio_vs_max_batch={b}"] = (
            on["server_tokens_per_s"] / off["server_tokens_per_s"]
        )
        out["batching"][f"decode_phase_ratio_vs_max_batch={b}"] = (
            on["decode_phase_tokens_per_s"] / off["decode_phase_tokens_per_s"]
        )
        # (as for split against cloud-only: at best, a free decode after the prefill)
        out["batching"][f"bound_vs_max_batch={b}"] = off["wall_s"] / on["all_first_tokens_s"]
    return out


def _brief(row: dict) -> str:
    return (
        f"{row['server_tokens_per_s']:.2f} tok/s total, {row['median_user_tokens_per_s']:.2f} "
        f"per user, mean batch {row['mean_batch_size']:.2f}, "
        f"text as recorded {sum(row['greedy_equal'])}/{len(row['greedy_equal'])}"
        f" (rounds drafted off it {sum(row['off_recording_rounds'])})"
    )


def print_capacity(results: dict) -> None:
    """The capacity table and its ratios."""
    print("users | split tok/s (per user) | cloud-only tok/s (per user) | split / cloud-only")
    for r in results["users"]:
        s, c = r["split"], r["cloud_only"]
        print(
            f"{r['users']:>5} | {s['server_tokens_per_s']:.2f} ({s['median_user_tokens_per_s']:.2f})"
            f" | {c['server_tokens_per_s']:.2f} ({c['median_user_tokens_per_s']:.2f})"
            f" | {r['split_over_cloud_only']:.2f}x (per user {r['per_user_split_over_cloud_only']:.2f}x;"
            f" at most {r['split_over_cloud_only_bound']:.2f}x with its prefill)"
        )
    b = results["batching"]
    for key, v in b.items():
        if key.startswith("ratio_vs_"):
            phase = b["decode_phase_" + key]
            bound = b["bound_" + key[len("ratio_") :]]
            print(
                f"batching at {b['clients']} clients, {key[len('ratio_vs_') :]} -> "
                f"{v:.2f}x end to end ({phase:.2f}x decode phase; at most {bound:.2f}x with "
                "its prefill)"
            )


def replay_clients(
    address: str,
    http_port: int | None,
    tokenizer,
    recs: list[dict],
    k: int,
    max_new: int,  # noqa: ANN001
    counters=None,  # noqa: ANN001 - () -> {"passes_total", "rounds_total"}; else /metrics
    off_recording: Proposer | None = None,
) -> dict:
    """One replaying client per recorded prompt, all at once, against a running server;
    server throughput, batching and latency figures. ``counters``: the server's pass and
    round totals (default: its Prometheus page on http_port); ``off_recording``: the drafter
    of clients whose text leaves its recording (default: none, plain decoding there)."""
    return concurrent_clients(
        lambda rec: _client_run(address, tokenizer, rec, k, max_new, off_recording),
        recs,
        http_port,
        counters,
    )


def cloud_clients(
    address: str, http_port: int | None, tokenizer, recs: list[dict], max_new: int, counters=None
) -> dict:  # noqa: ANN001
    """One cloud-only client per recorded prompt, all at once (see ``replay_clients``)."""
    return concurrent_clients(
        lambda rec: _cloud_client_run(address, tokenizer, rec, max_new), recs, http_port, counters
    )


def concurrent_clients(run_one, recs: list[dict], http_port: int | None, counters=None) -> dict:  # noqa: ANN001
    """``run_one(rec)`` for every record on its own thread, all at once; total and per-user
    tokens/s (end to end: from the start to each user's last token), batching and latency."""
    counters = counters or (lambda: _scrape(http_port))
    before = counters()
    per: list[dict | None] = [None] * len(recs)

    def run(i: int) -> None:
        per[i] = run_one(recs[i])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(recs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = counters()
    if any(p is None for p in per):
        raise RuntimeError("a client failed: see the error above")
    tokens = sum(p["new_tokens"] for p in per)
    # decode phase: from the moment every client has its first token to the last token
    t_all = max(p["chunks"][0][0] for p in per)
    t_end = max(p["chunks"][-1][0] for p in per)
    decode_tokens = sum(n for p in per for t, n in p["chunks"] if t > t_all)
    passes = after["passes_total"] - before["passes_total"]
    tbt = [g for p in per for g in p["tbt_s"]]
    user_tps = [p["tokens_per_s"] for p in per]
    return {
        "wall_s": wall,
        "server_tokens_per_s": tokens / wall,
        "median_user_tokens_per_s": statistics.median(user_tps),
        "user_tokens_per_s": user_tps,
        "decode_phase_tokens_per_s": decode_tokens / max(1e-9, t_end - t_all),
        "all_first_tokens_s": t_all - t0,  # until every user had its first token (prefill)
        "tokens": tokens,
        "batched_passes": passes,
        "prefill_passes": after.get("prefill_passes_total", 0)
        - before.get("prefill_passes_total", 0),
        "target_passes_per_token": passes / tokens,
        "mean_batch_size": (after["rounds_total"] - before["rounds_total"]) / max(1, passes),
        "median_ttft_s": statistics.median(p["ttft_s"] for p in per),
        "p50_tbt_s": float(np.percentile(tbt, 50)) if tbt else None,
        "p99_tbt_s": float(np.percentile(tbt, 99)) if tbt else None,
        "greedy_equal": [p["greedy_equal"] for p in per],
        # rounds a replaying client drafted itself, its text having left the recording
        "off_recording_rounds": [p.get("off_recording_rounds", 0) for p in per],
    }


def _scrape(http_port: int) -> dict:
    """Counters from the server's Prometheus page."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("specsplit_") and "{" not in line:
            name, value = line.split()
            out[name.removeprefix("specsplit_")] = float(value)
    return out


# ---- memory: idle sessions against weights + KV budget ----


def cmd_memory(ns: argparse.Namespace) -> dict:
    from specsplit.faces.api import load_tokenizer
    from specsplit.faces.serve import parse_size
    from specsplit.sampling import SamplingParams
    from specsplit.transport.client import RemoteVerifier

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(ns.target)
    port = free_port()
    server = start_server(
        serve_args(ns, "--max-sessions", str(ns.sessions + 8), "--kv-budget", ns.kv_budget),
        port,
        out / "server_memory.log",
    )
    try:
        idle_rss, _ = rss_bytes(server.pid)
        texts = [p.text for p in prompts_of(ns)]
        verifiers = []
        for i in range(ns.sessions):
            v = RemoteVerifier([f"127.0.0.1:{port}"], tokenizer)
            ids = chat_ids(tokenizer, texts[i % len(texts)])[: ns.prompt_tokens]
            v.open(ids, SamplingParams(), i)
            verifiers.append(v)
        time.sleep(2)
        rss, hwm = rss_bytes(server.pid)
        for v in verifiers:
            v.shutdown()
    finally:
        stop_server(server)
    budget = parse_size(ns.kv_budget)
    return {
        "config": _config(ns),
        "rss_loaded_idle_bytes": idle_rss,
        "rss_with_sessions_bytes": rss,
        "peak_rss_bytes": hwm,
        "kv_budget_bytes": budget,
        "sessions": ns.sessions,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="split_bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("rtt", "throughput", "memory"):
        p = sub.add_parser(name)
        p.add_argument("--target", default="qwen2.5-coder-1.5b")
        p.add_argument("--target-backend", default="torch")
        p.add_argument("--dtype", default=None, choices=DTYPES)
        p.add_argument("--draft", default="qwen2.5-coder-0.5b-iq4_nl")
        p.add_argument("--draft-backend", default="llama.cpp")
        p.add_argument("--suite", default="humaneval", choices=("humaneval", "spec-bench"))
        p.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
        p.add_argument("--limit", type=int, default=5)
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--out", default=f"bench_runs/split_{name}")
    sub.choices["rtt"].add_argument("--rtt", default="0,20,80", help="round-trip times in ms")
    sub.choices["rtt"].add_argument("--temperature", type=float, default=0.0)
    sub.choices["rtt"].add_argument(
        "--pin", action="store_true", help="server on core 0, client on core 1, 1 thread each"
    )
    sub.choices["rtt"].add_argument(
        "--compare-ahead", action="store_true", help="also the edge without drafting ahead"
    )
    sub.choices["rtt"].add_argument("--no-cloud", action="store_true", help="skip cloud-only")
    sub.choices["throughput"].add_argument(
        "--users", default="1,2,4,8", help="concurrent users, split and cloud-only, at each"
    )
    sub.choices["throughput"].add_argument(
        "--clients",
        type=int,
        default=None,
        help="split users of the batching comparison (the most --users)",
    )
    sub.choices["throughput"].add_argument(
        "--batch", default="8,1", help="max batch sizes: the server of --users, then those compared"
    )
    sub.choices["throughput"].add_argument("--k", type=int, default=4)
    sub.choices["memory"].add_argument("--sessions", type=int, default=100)
    sub.choices["memory"].add_argument("--kv-budget", default="256MiB")
    sub.choices["memory"].add_argument("--prompt-tokens", type=int, default=48)
    ns = ap.parse_args(argv)
    if ns.cmd == "throughput":
        ns.clients = ns.clients or max(int(x) for x in ns.users.split(","))
        ns.limit = max(ns.limit, ns.clients)
    os.makedirs(ns.out, exist_ok=True)
    doc = {"rtt": cmd_rtt, "throughput": cmd_throughput, "memory": cmd_memory}[ns.cmd](ns)
    doc["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = Path(ns.out) / "results.json"
    path.write_text(json.dumps(doc, indent=1))
    if ns.cmd == "throughput":
        print_capacity(doc["results"])
    else:
        print(json.dumps(doc.get("summary") or doc.get("results") or doc, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
