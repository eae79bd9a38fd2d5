"""Soak: many concurrent sessions for minutes against one server with a KV budget.

Sessions are spread over at most --processes client processes (threads in each), half greedy
and half sampled, drafting with n-gram, the draft model (SmolLM2 drafting for itself), or
replaying drafts recorded earlier (tokens and quantized q, so sampled ones replay exactly and
cost no CPU). Each session runs requests back to back until the time is up, then finishes the
one in progress. Figures: failed requests, time between tokens, the server's RSS every
--sample-every seconds against weights + KV budget + fixed overhead + per session.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from specsplit.bench.reliability.common import (
    Client,
    ClientSpec,
    Recorder,
    Replayer,
    Request,
    Server,
    load_average,
    load_prompt_ids,
    model_drafter,
    pct,
    serve_args,
    tbt,
)

DRAFTERS = ("ngram", "model", "replay")
PER_SESSION = 2.5e6  # bytes outside the KV cache per open session (README: server memory)


def session_specs(ns: argparse.Namespace) -> list[ClientSpec]:
    """Half greedy, half sampled; the drafters in turn."""
    specs = []
    for s in range(ns.sessions):
        sampled = s % 2 == 1
        drafter = DRAFTERS[(s // 2) % len(DRAFTERS)]
        k = ns.k if drafter == "replay" else None  # recorded at a fixed K
        mode = "sampled" if sampled else "greedy"
        specs.append(ClientSpec(f"s{s}-{mode}-{drafter}", drafter, ns.temperature * sampled, k))
    return specs


def record(ns: argparse.Namespace, address: str, prompts: list, tok) -> dict:  # noqa: ANN001
    """Drafts of the draft model for every prompt, greedy and sampled (fixed K, seed = the
    prompt's index), through the server; cached in --out."""
    from specsplit.engine.draft_length import FixedK
    from specsplit.engine.speculative import DecodeLoop, GenerationRequest
    from specsplit.sampling import SamplingParams
    from specsplit.transport.client import RemoteVerifier

    path = Path(ns.out) / "recorded_drafts.json"
    key = {"prompts": [p for p, _ in prompts], "k": ns.k, "max_new_tokens": ns.max_new_tokens}
    key["temperature"] = ns.temperature
    if path.exists():
        doc = json.loads(path.read_text())
        if doc["key"] == key:
            return doc["recordings"]
    drafter = model_drafter(ns)
    verifier = RemoteVerifier([address], tok)
    out = {}
    try:
        for i, (pid, ids) in enumerate(prompts):
            for temperature in (0.0, ns.temperature):
                rec = Recorder(drafter)
                loop = DecodeLoop(verifier, [rec], FixedK(ns.k), pipeline=False)
                params = SamplingParams(temperature=temperature)
                res = loop.generate(GenerationRequest(ids, ns.max_new_tokens, params, seed=i))
                out[Replayer.key(pid, temperature)] = {
                    "seed": i,
                    "prompt_ids": ids,
                    "output_ids": res.token_ids,
                    "drafts": {str(n): d for n, d in rec.drafts.items()},
                }
    finally:
        verifier.shutdown()
    path.write_text(json.dumps({"key": key, "recordings": out}))
    return out


def cmd_soak(ns: argparse.Namespace) -> dict:
    from specsplit.faces.api import load_tokenizer
    from specsplit.faces.serve import parse_size

    out = Path(ns.out)
    tok = load_tokenizer(ns.target)
    prompts = load_prompt_ids(ns, tok)
    server = Server(
        "soak",
        serve_args(ns, "--kv-budget", ns.kv_budget, "--max-sessions", str(ns.sessions)),
        out,
    )
    server.start()
    workers: list[subprocess.Popen] = []
    try:
        time.sleep(2)
        idle_rss = server.rss()  # loaded, no session yet: weights + fixed overhead
        recordings = record(ns, server.address, prompts, tok)
        specs = session_specs(ns)
        n_proc = min(ns.processes, ns.sessions)
        go = out / "go.json"
        go.unlink(missing_ok=True)
        for p in range(n_proc):
            plan = {
                "server": server.address,
                "target": ns.target,
                "draft": ns.draft,
                "draft_backend": ns.draft_backend,
                "max_new_tokens": ns.max_new_tokens,
                "prompts": prompts,
                "recordings": str(out / "recorded_drafts.json"),
                "sessions": [
                    {"index": s, "spec": vars(spec)}
                    for s, spec in enumerate(specs)
                    if s % n_proc == p
                ],
                "go": str(go),
                "ready": str(out / f"ready_{p}"),
                "out": str(out / f"worker_{p}.json"),
            }
            Path(plan["ready"]).unlink(missing_ok=True)
            path = out / f"plan_{p}.json"
            path.write_text(json.dumps(plan))
            log = open(out / f"worker_{p}.log", "w")  # noqa: SIM115 - closed with the process
            cmd = [sys.executable, "-m", "specsplit.bench.reliability", "_worker", str(path)]
            workers.append(subprocess.Popen(cmd, stdout=log, stderr=log))
        _wait_ready(out, n_proc, workers)
        t_start = time.monotonic()
        deadline = t_start + 60 * ns.minutes
        go.write_text(json.dumps({"deadline": deadline}))
        print(
            f"soak: {ns.sessions} sessions in {n_proc} processes for {ns.minutes:g} min", flush=True
        )
        samples = _monitor(ns, server, workers, t_start, deadline)
        drained = server.drained()
        final = _sample(server, t_start)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        server.stop()
    records = []
    for p in range(len(workers)):
        path = out / f"worker_{p}.json"
        records += json.loads(path.read_text()) if path.exists() else []
    bound = idle_rss + parse_size(ns.kv_budget) + PER_SESSION * ns.sessions
    doc = {
        "config": {k: v for k, v in vars(ns).items() if k != "func"},
        "weights_bytes": weights_bytes(ns.target),
        "rss_loaded_idle_bytes": idle_rss,
        "rss_bound_bytes": bound,
        "samples": samples,
        "final": final,
        "records": records,
    }
    doc["summary"] = summarise(doc, recordings, drained, [w.returncode for w in workers])
    return doc


def _wait_ready(out: Path, n: int, workers: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 600
    while not all((out / f"ready_{p}").exists() for p in range(n)):
        if any(w.poll() is not None for w in workers) or time.monotonic() > deadline:
            raise RuntimeError(f"a soak client process failed to start: see {out}/worker_*.log")
        time.sleep(0.5)


def _sample(server: Server, t_start: float) -> dict:
    m = server.metrics() if server.alive() else {}
    return {
        "t": time.monotonic() - t_start,
        "alive": server.alive(),
        "rss": server.rss() if server.alive() else None,
        "sessions": m.get("sessions"),
        "kv_bytes": m.get("kv_bytes"),
        "evictions": m.get("evictions_total"),
        "passes": m.get("passes_total"),
        "emitted": m.get("emitted_tokens_total"),
        "load": load_average(),
    }


def _monitor(
    ns: argparse.Namespace,
    server: Server,
    workers: list[subprocess.Popen],
    t_start: float,
    deadline: float,
) -> list[dict]:
    """RSS and counters every --sample-every seconds until the workers end (or hang)."""
    samples = []
    give_up = deadline + 600  # requests in progress at the deadline finish first
    while any(w.poll() is None for w in workers) and time.monotonic() < give_up:
        samples.append(_sample(server, t_start))
        s = samples[-1]
        rss = f"{s['rss'] / 1e9:.3f} GB" if s["rss"] else "dead"
        print(
            f"t={s['t']:.0f}s rss={rss} sessions={s['sessions']} kv={s['kv_bytes']} "
            f"evictions={s['evictions']} load={s['load'][0]:.1f}",
            flush=True,
        )
        t_next = time.monotonic() + ns.sample_every
        while time.monotonic() < t_next and any(w.poll() is None for w in workers):
            time.sleep(0.2)
    return samples


def weights_bytes(target: str) -> int:
    """The target's weights as the torch backend holds them (float32), from its GGUF."""
    import gguf

    from specsplit.registry import resolve_gguf

    reader = gguf.GGUFReader(resolve_gguf(target))
    return 4 * sum(int(t.n_elements) for t in reader.tensors)


def summarise(doc: dict, recordings: dict, drained: bool, exits: list) -> dict:  # noqa: ANN001
    recs = doc["records"]
    ok = [r for r in recs if r["error"] is None]
    per_token, gaps = [], []
    for r in ok:
        a, b = tbt(r["chunks"])
        per_token += a
        gaps += b
    ttft = [r["chunks"][0][0] - r["t0"] for r in ok if r["chunks"]]
    rss = [s["rss"] for s in doc["samples"] if s["rss"]]
    replays = [r for r in ok if r["drafter"] == "replay"]
    as_recorded = sum(
        r["ids"] == recordings[Replayer.key(r["prompt"], r["temperature"])]["output_ids"]
        for r in replays
    )
    span = [min(r["t0"] for r in recs), max(r["t1"] for r in recs)] if recs else [0, 0]
    tokens = sum(len(r["ids"]) for r in ok)
    return {
        "sessions": doc["config"]["sessions"],
        "minutes": doc["config"]["minutes"],
        "requests": len(recs),
        "failed": len(recs) - len(ok),
        "errors": sorted({r["error"] for r in recs if r["error"]}),
        "tokens": tokens,
        "tokens_per_s": tokens / max(1e-9, span[1] - span[0]),
        "p50_tbt_s": pct(per_token, 50),
        "p99_tbt_s": pct(per_token, 99),
        "p99_chunk_gap_s": pct(gaps, 99),
        "max_chunk_gap_s": max(gaps) if gaps else None,
        "median_ttft_s": statistics.median(ttft) if ttft else None,
        "p99_ttft_s": pct(ttft, 99),
        "reconnects": sum(r.get("reconnects") or 0 for r in ok),
        "replays_as_recorded": f"{as_recorded}/{len(replays)}",
        "rss_samples": len(rss),
        "rss_max_bytes": max(rss) if rss else None,
        "rss_bound_bytes": doc["rss_bound_bytes"],
        "rss_within_bound": bool(rss) and max(rss) <= doc["rss_bound_bytes"],
        "rss_loaded_idle_bytes": doc["rss_loaded_idle_bytes"],
        "weights_bytes": doc["weights_bytes"],
        "server_alive": all(s["alive"] for s in doc["samples"]) and doc["final"]["alive"],
        "evictions": doc["final"]["evictions"],
        "sessions_left_after": not drained,
        "worker_exit_codes": exits,
    }


# ---- a client process ----


def worker(plan_path: Path) -> int:
    """Run a soak plan's sessions (one thread each) from the go signal to its deadline."""
    from specsplit.faces.api import load_tokenizer

    plan = json.loads(plan_path.read_text())
    tok = load_tokenizer(plan["target"])
    ns = argparse.Namespace(draft=plan["draft"], draft_backend=plan["draft_backend"])
    recordings = json.loads(Path(plan["recordings"]).read_text())["recordings"]
    clients = []
    for item in plan["sessions"]:
        spec = ClientSpec(**item["spec"])
        draft = None
        if spec.drafter == "model":
            draft = model_drafter(ns)
        elif spec.drafter == "replay":
            draft = Replayer(recordings, tok.vocab_size)
        clients.append((item["index"], Client(spec, [plan["server"]], tok, draft=draft)))
    Path(plan["ready"]).write_text("ready")
    go = Path(plan["go"])
    while not go.exists():
        time.sleep(0.1)
    time.sleep(0.2)  # the file is complete
    deadline = json.loads(go.read_text())["deadline"]
    prompts = plan["prompts"]
    records: list[dict] = []
    lock = threading.Lock()

    def loop(index: int, client: Client) -> None:
        j = 0
        while time.monotonic() < deadline:
            p = (index + j) % len(prompts)
            pid, ids = prompts[p]
            seed = p if client.spec.drafter == "replay" else 1_000_000 * index + j
            rec = client.run(Request(j, pid, tuple(ids), plan["max_new_tokens"], seed))
            rec.update(drafter=client.spec.drafter, temperature=client.spec.temperature)
            with lock:
                records.append(rec)
            j += 1

    threads = [threading.Thread(target=loop, args=c, daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _, c in clients:
        c.close()
    Path(plan["out"]).write_text(json.dumps(records))
    return 0
