"""Benchmarks of the service on Ray Serve (``specsplit.cluster``): the Ray path's cost against
plain `specsplit serve`, throughput with one and two replicas, and failover time.

    python -m specsplit.bench.cluster overhead --limit 5 --out benchmarks/ray_overhead
    python -m specsplit.bench.cluster scaling --clients 8 --out benchmarks/ray_scaling
    python -m specsplit.bench.cluster failover --kills 10 --out benchmarks/ray_failover

This process is the Ray driver (a local instance, ``num_cpus=2``, no dashboard) and runs the
edge clients; plain `specsplit serve` is a subprocess. Results go to ``--out`` as JSON, with
the machine's load average before and after; the summary is printed.

- ``overhead``: plain `specsplit serve` and a one-replica deployment, both loaded, with the
  same threads; the 0.5B llama.cpp drafter at the edge, K auto, RTT 0; the two interleaved
  per prompt (alternating which goes first). Per prompt: tokens/s, and network time per
  round trip (the client's wall time of a round less the server's verify and queue time).
- ``scaling``: 8 clients replaying drafts recorded at K = 4 (``split.record_drafts``, as
  ``split throughput``) against one replica pinned to core 0, then two replicas pinned to
  cores 0 and 1 (one thread each); repeated, alternating. Batches per replica from Ray's
  metrics.
- ``failover``: two replicas, two replaying clients; the replica of the first client is
  killed (SIGKILL) after its 8th token; from the kill to the session reopened elsewhere and
  to the next token, per kill; Serve replaces the replica before the next kill.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

from specsplit.bench.split import (
    _client_run,
    chat_ids,
    free_port,
    prompts_of,
    record_drafts,
    replay_clients,
    serve_args,
    start_server,
    stop_server,
)

REPLICA_TITLE = b"ray::ServeReplica:specsplit:SpecsplitReplica"


def replica_settings(ns: argparse.Namespace, threads: int | None, max_sessions: int) -> dict:
    """What each replica builds its server from (`specsplit serve` flags as data)."""
    from specsplit.faces.serve import _REPLICA, ServeSettings

    s = ServeSettings(
        target=ns.target,
        target_backend=ns.target_backend,
        threads=threads,
        rate=0,
        max_sessions=max_sessions,
    )
    return {k: v for k, v in asdict(s).items() if k in _REPLICA}


class Deployment:
    """A local Ray instance running the specsplit application (this process drives it)."""

    def __init__(self, settings: dict, replicas: int, cpus: float, max_sessions: int) -> None:
        import ray

        from specsplit.cluster import launch
        from specsplit.cluster.spec import ClusterSpec

        self.spec = ClusterSpec(
            server_factory="specsplit.faces.serve:replica_server",
            settings=settings,
            grpc_port=free_port(),
            http_port=free_port(),
            replicas=replicas,
            max_sessions=max_sessions,
            cpus_per_replica=cpus,
        )
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 << 20,
            runtime_env=self.spec.runtime_env(),
            log_to_driver=False,
            _system_config={"metrics_report_interval_ms": 1000},  # (Ray's default: 10 s)
        )
        launch.start_serve(self.spec)
        launch.deploy(self.spec, timeout=1800)
        self.address = f"127.0.0.1:{self.spec.grpc_port}"

    def scale(self, n: int) -> None:
        """A light update to n replicas; returns once exactly n run."""
        from specsplit.cluster import launch

        self.spec = replace(self.spec, replicas=n)
        launch.deploy(self.spec, timeout=1800)
        self.wait_replicas(n)

    def wait_replicas(self, n: int, timeout: float = 1800.0) -> None:
        from specsplit.cluster.launch import running_replicas

        end = time.monotonic() + timeout
        while running_replicas(self.spec.app_name) != n or len(replica_pids()) != n:
            if time.monotonic() > end:
                raise RuntimeError(f"not {n} replicas after {timeout:.0f} s")
            time.sleep(1.0)

    def counters(self) -> dict[str, dict[str, float]]:
        """Per replica: passes and rounds (Ray's metrics: the replica sets its gauges every
        2 s, Ray reports them every 1 s; read after both)."""
        import urllib.request

        from specsplit.cluster.launch import metrics_url

        time.sleep(4.0)
        with urllib.request.urlopen(metrics_url(), timeout=10) as r:
            text = r.read().decode()
        out: dict[str, dict[str, float]] = {}
        for line in text.splitlines():
            for name in ("passes_total", "rounds_total"):
                if line.startswith(f"ray_specsplit_{name}{{"):
                    replica = line.split('replica="', 1)[1].split('"', 1)[0]
                    out.setdefault(replica, {})[name] = float(line.rsplit(" ", 1)[1])
        return out

    def total_counters(self) -> dict[str, float]:
        per = self.counters()
        return {
            k: sum(c.get(k, 0.0) for c in per.values()) for k in ("passes_total", "rounds_total")
        }

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def replica_pids() -> list[int]:
    """The replicas' processes (by the title Ray gives them)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(REPLICA_TITLE):
                out.append(int(pid))
        except OSError:
            continue
    return sorted(out)


def pin(pid: int, core: int) -> None:
    """Every thread of a process to one core (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:
            continue


def pid_listening(port: int) -> int:
    """The process listening on a local TCP port (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":
                inodes.add(f[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    raise LookupError(f"nobody listens on port {port}")


# ---- overhead: the Ray path against plain serve ----


def cmd_overhead(ns: argparse.Namespace) -> dict:
    from specsplit.backends.load import load_backend
    from specsplit.engine.speculative import GenerationRequest
    from specsplit.faces.api import EdgeDecoder

    out = Path(ns.out)
    port = free_port()
    threads = ns.threads
    plain = start_server(
        serve_args(ns, *(["--threads", str(threads)] if threads else [])), port, out / "plain.log"
    )
    dep = None
    try:
        dep = Deployment(replica_settings(ns, threads, 16), 1, float(threads or 2), 16)
        draft = load_backend(ns.draft_backend, ns.draft, n_ctx=4096)
        edges = {
            "plain": EdgeDecoder([f"127.0.0.1:{port}"], draft, k=None, n_ctx=4096),
            "ray": EdgeDecoder([dep.address], draft, k=None, n_ctx=4096),
        }
        tok = draft.tokenizer
        for e in edges.values():  # warm-up (the target's first passes, the drafter's)
            e.engine.generate(GenerationRequest(chat_ids(tok, "Say hi."), 8))
        records = []
        for i, p in enumerate(prompts_of(ns)):
            ids = chat_ids(tok, p.text)
            req = GenerationRequest(ids, ns.max_new_tokens, seed=i)
            rec: dict = {"id": p.id, "prompt_tokens": len(ids), "results": {}}
            order = ["plain", "ray"] if i % 2 == 0 else ["ray", "plain"]
            for name in order:
                res = edges[name].engine.generate(req)
                st = res.stats
                rec["results"][name] = {
                    **st.as_dict(rounds=False),
                    "token_ids": res.token_ids,
                    "network_ms_per_round_trip": 1e3 * st.t_network / max(1, st.round_trips),
                }
            r = rec["results"]
            rec["ratio"] = r["ray"]["tokens_per_s"] / r["plain"]["tokens_per_s"]
            rec["same_text"] = r["ray"]["token_ids"] == r["plain"]["token_ids"]
            records.append(rec)
            print(
                f"[{i + 1}] plain {r['plain']['tokens_per_s']:.2f} tok/s, ray "
                f"{r['ray']['tokens_per_s']:.2f} tok/s ({rec['ratio']:.3f}x), network per round "
                f"{r['plain']['network_ms_per_round_trip']:.2f} / "
                f"{r['ray']['network_ms_per_round_trip']:.2f} ms",
                flush=True,
            )
        handshake = {n: e.verifier.link.rtt * 1e3 for n, e in edges.items()}
        for e in edges.values():
            e.close()
    finally:
        stop_server(plain)
        if dep is not None:
            dep.stop()

    def net(name: str) -> float:
        rs = [r["results"][name] for r in records]
        return 1e3 * sum(x["network_s"] for x in rs) / sum(x["round_trips"] for x in rs)

    summary = {
        name: {
            "median_tokens_per_s": statistics.median(
                r["results"][name]["tokens_per_s"] for r in records
            ),
            "network_ms_per_round_trip": net(name),
            "round_trips": sum(r["results"][name]["round_trips"] for r in records),
            "handshake_ms": handshake[name],
        }
        for name in ("plain", "ray")
    }
    summary["median_ratio_ray_over_plain"] = statistics.median(r["ratio"] for r in records)
    summary["overhead_ms_per_round_trip"] = (
        summary["ray"]["network_ms_per_round_trip"] - summary["plain"]["network_ms_per_round_trip"]
    )
    summary["same_text"] = sum(r["same_text"] for r in records)
    return {"summary": summary, "prompts": records}


# ---- scaling: one replica on one core against two on two ----


def cmd_scaling(ns: argparse.Namespace) -> dict:
    from specsplit.faces.api import load_tokenizer

    recs = record_drafts(ns)
    tokenizer = load_tokenizer(ns.target)
    dep = Deployment(replica_settings(ns, 1, 2 * ns.clients), 1, 1.0, 2 * ns.clients)
    runs = []
    try:
        for rep in range(ns.repeats):
            for n in (1, 2) if rep % 2 == 0 else (2, 1):
                dep.scale(n)
                pids = replica_pids()
                for core, pid in enumerate(pids):
                    pin(pid, core)
                _client_run(dep.address, tokenizer, recs[0], ns.k, 4)  # warm-up
                if n == 2:
                    _client_run(dep.address, tokenizer, recs[1], ns.k, 4)  # (the other one)
                before = dep.counters()
                row = replay_clients(
                    dep.address, None, tokenizer, recs, ns.k, ns.max_new_tokens,
                    counters=dep.total_counters,
                )  # fmt: skip
                after = dep.counters()
                row["per_replica"] = {
                    r: {
                        "passes": c["passes_total"] - before.get(r, {}).get("passes_total", 0),
                        "rounds": c["rounds_total"] - before.get(r, {}).get("rounds_total", 0),
                    }
                    for r, c in after.items()
                }
                # batching from the replicas that ran (the totals can still hold a removed
                # replica's last counters before the run and not after it)
                passes = sum(c["passes"] for c in row["per_replica"].values())
                rounds = sum(c["rounds"] for c in row["per_replica"].values())
                row.update(
                    batched_passes=passes,
                    target_passes_per_token=passes / row["tokens"],
                    mean_batch_size=rounds / max(1, passes),
                )
                row.update(replicas=n, repeat=rep, pinned={str(p): c for c, p in enumerate(pids)})
                row["load"] = os.getloadavg()
                runs.append(row)
                print(
                    f"{n} replica(s): {row['server_tokens_per_s']:.2f} tok/s end to end, decode "
                    f"{row['decode_phase_tokens_per_s']:.2f}, mean batch {row['mean_batch_size']:.2f}",
                    flush=True,
                )
    finally:
        dep.stop()

    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["replicas"] == n)

    summary = {
        f"{n}_replica{'s' if n > 1 else ''}": {
            "tokens_per_s": med(n, "server_tokens_per_s"),
            "decode_phase_tokens_per_s": med(n, "decode_phase_tokens_per_s"),
            "mean_batch_size": med(n, "mean_batch_size"),
            "median_ttft_s": med(n, "median_ttft_s"),
        }
        for n in (1, 2)
    }
    pairs = [
        (a["server_tokens_per_s"], b["server_tokens_per_s"])
        for a in runs
        if a["replicas"] == 2
        for b in runs
        if b["replicas"] == 1 and b["repeat"] == a["repeat"]
    ]
    summary["ratio_per_repeat"] = [a / b for a, b in pairs]
    summary["ratio"] = summary["2_replicas"]["tokens_per_s"] / summary["1_replica"]["tokens_per_s"]
    summary["decode_phase_ratio"] = (
        summary["2_replicas"]["decode_phase_tokens_per_s"]
        / summary["1_replica"]["decode_phase_tokens_per_s"]
    )
    summary["text_as_recorded"] = [sum(r["greedy_equal"]) for r in runs]
    return {"summary": summary, "runs": runs}


# ---- failover: a replica's death to the next token at its clients ----


def _watched_client(dep: Deployment, tokenizer, rec: dict, k: int, max_new: int, log: dict):  # noqa: ANN001, ANN202
    """A replaying client whose chunk times and session ids are logged as it goes."""
    from specsplit.bench.split import ReplayProposer
    from specsplit.engine.draft_length import FixedK
    from specsplit.engine.speculative import DecodeLoop, GenerationRequest
    from specsplit.transport.client import RemoteVerifier

    drafts = {int(n): d for n, d in rec["drafts"].items()}
    prop = ReplayProposer(drafts, rec["prompt_ids"] + rec["output_ids"])
    v = RemoteVerifier([dep.address], tokenizer, retry_for=120)
    loop = DecodeLoop(v, [prop], FixedK(k), pipeline=False)
    log.update(chunks=[], sessions=[], verifier=v, done=False)

    def watch_sessions() -> None:
        while not log["done"]:
            sid = v.session_id
            if sid and (not log["sessions"] or log["sessions"][-1][1] != sid):
                log["sessions"].append((time.monotonic(), sid))
            time.sleep(0.005)

    threading.Thread(target=watch_sessions, daemon=True).start()
    tokens = 0
    try:
        for chunk in loop.stream(GenerationRequest(rec["prompt_ids"], max_new)):
            tokens += len(chunk.token_ids)
            log["chunks"].append((time.monotonic(), tokens))
            if chunk.result is not None:
                log["result"] = chunk.result
    except Exception as e:  # noqa: BLE001 - reported with the kill
        log["error"] = f"{type(e).__name__}: {e}"
    finally:
        log["done"] = True
        v.shutdown()


def cmd_failover(ns: argparse.Namespace) -> dict:
    from specsplit.faces.api import load_tokenizer

    recs = record_drafts(ns)
    tokenizer = load_tokenizer(ns.target)
    dep = Deployment(replica_settings(ns, 1, 16), 2, 1.0, 16)
    kills = []
    try:
        for i in range(ns.kills):
            dep.wait_replicas(2)
            logs: list[dict] = [{}, {}]
            pair = [recs[i % len(recs)], recs[(i + 1) % len(recs)]]
            threads = [
                threading.Thread(
                    target=_watched_client,
                    args=(dep, tokenizer, pair[j], ns.k, ns.max_new_tokens, logs[j]),
                )
                for j in range(2)
            ]
            for t in threads:
                t.start()
            while not logs[0].get("chunks") or logs[0]["chunks"][-1][1] < 8:
                time.sleep(0.01)
            victim = logs[0]["verifier"].link.session_address
            pid = pid_listening(int(victim.rsplit(":", 1)[1]))
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            for t in threads:
                t.join(600)
            kill = {"kill": i, "pid": pid, "load": os.getloadavg(), "clients": []}
            for j, log in enumerate(logs):
                if "result" not in log:
                    raise RuntimeError(f"client {j} failed: {log.get('error')}")
                res = log["result"]
                moved = res.stats.reconnects > 0
                after = [t for t, _ in log["chunks"] if t > t_kill]
                reopened = [t for t, _ in log["sessions"] if t > t_kill]
                kill["clients"].append(
                    {
                        "on_killed_replica": moved,
                        "reconnects": res.stats.reconnects,
                        "reopened_s": reopened[0] - t_kill if moved and reopened else None,
                        "next_token_s": after[0] - t_kill if after else None,
                        "text_as_recorded": res.token_ids == pair[j]["output_ids"],
                        "new_tokens": res.stats.new_tokens,
                    }
                )
            kills.append(kill)
            c0 = kill["clients"][0]
            print(
                f"kill {i + 1}: session reopened after {c0['reopened_s']:.2f} s, next token "
                f"after {c0['next_token_s']:.2f} s; texts as recorded: "
                f"{[c['text_as_recorded'] for c in kill['clients']]}",
                flush=True,
            )
    finally:
        dep.stop()
    moved = [c for k in kills for c in k["clients"] if c["on_killed_replica"]]
    summary = {
        "kills": len(kills),
        "median_next_token_s": statistics.median(c["next_token_s"] for c in moved),
        "median_reopened_s": statistics.median(c["reopened_s"] for c in moved),
        "max_next_token_s": max(c["next_token_s"] for c in moved),
        "clients_moved": len(moved),
        "text_as_recorded": sum(c["text_as_recorded"] for k in kills for c in k["clients"]),
        "clients": sum(len(k["clients"]) for k in kills),
    }
    return {"summary": summary, "kills": kills}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cluster_bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("overhead", "scaling", "failover"):
        p = sub.add_parser(name)
        p.add_argument("--target", default="qwen2.5-coder-1.5b")
        p.add_argument("--target-backend", default="torch")
        p.add_argument("--draft", default="qwen2.5-coder-0.5b-iq4_nl")
        p.add_argument("--draft-backend", default="llama.cpp")
        p.add_argument("--suite", default="humaneval", choices=("humaneval", "spec-bench"))
        p.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
        p.add_argument("--limit", type=int, default=5)
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--k", type=int, default=4)
        p.add_argument("--clients", type=int, default=8)
        p.add_argument("--out", default=f"bench_runs/ray_{name}")
    sub.choices["overhead"].add_argument("--threads", type=int, default=None)
    sub.choices["scaling"].add_argument("--repeats", type=int, default=2)
    sub.choices["failover"].add_argument("--kills", type=int, default=10)
    ns = ap.parse_args(argv)
    if ns.cmd != "overhead":
        ns.limit = max(ns.limit, ns.clients)  # (the recorded drafts: one per client)
    os.makedirs(ns.out, exist_ok=True)
    load = os.getloadavg()
    doc = {"overhead": cmd_overhead, "scaling": cmd_scaling, "failover": cmd_failover}[ns.cmd](ns)
    doc["config"] = {k: v for k, v in vars(ns).items() if k != "func"}
    doc["load_before"], doc["load_after"] = load, os.getloadavg()
    doc["command"] = " ".join(["python -m specsplit.bench.cluster", *(argv or sys.argv[1:])])
    doc["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = Path(ns.out) / "results.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
