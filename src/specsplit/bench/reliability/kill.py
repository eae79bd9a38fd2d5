"""kill -9 a server that holds sessions, at random moments, while clients generate with two
`--server` addresses; the killed server is restarted on its port each time.

Clients: edge clients (greedy and seeded-sampled, an n-gram drafter and the draft model) and
cloud-only ones, each looping over its requests with the servers [A, B]. References: the same
requests without kills (run first, the same clients at once), and for greedy ones the target
alone's own text (this process, after the servers stopped). Every finished generation is
compared with its reference token by token (lost, duplicated, changed); the reconnect time
of a kill is, for each client that had a request on the killed server, the time from the kill
to its next token.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from pathlib import Path

from specsplit.bench.reliability.common import (
    Client,
    ClientSpec,
    Request,
    Server,
    compare,
    decision_margin,
    load_average,
    load_prompt_ids,
    model_drafter,
    pct,
    serve_args,
    spec_dicts,
)


def roster(ns: argparse.Namespace) -> list[ClientSpec]:
    """Edge clients from --edge ("mode:drafter,..."), then cloud-only ones from --cloud."""
    specs = []
    for i, item in enumerate(x for x in ns.edge.split(",") if x):
        mode, drafter = item.split(":")
        sampled = mode == "sampled"
        specs.append(
            ClientSpec(
                f"edge{i}-{mode}-{drafter}",
                drafter,
                ns.temperature if sampled else 0.0,
                ns.k if sampled else None,  # greedy: the automatic K, as by default
            )
        )
    for i, mode in enumerate(x for x in ns.cloud.split(",") if x):
        specs.append(ClientSpec(f"cloud{i}-{mode}", "none", ns.temperature * (mode == "sampled")))
    return specs


def requests_of(specs: list[ClientSpec], prompts: list, max_new: int) -> dict[str, list[Request]]:
    """Each client's requests: every prompt, starting at its own offset; a fixed seed each."""
    out = {}
    for c, spec in enumerate(specs):
        n = len(prompts)
        out[spec.name] = [
            Request(i, *prompts[(c + i) % n], max_new, seed=1000 * c + i) for i in range(n)
        ]
    return out


def run_clients(
    clients: list[Client], requests: dict[str, list[Request]], stop: threading.Event | None
) -> list[dict]:
    """Every client runs its requests in a loop in its own thread: once (stop None) or until
    stop is set (the request in progress finishes)."""
    records: list[dict] = []
    lock = threading.Lock()

    def loop(client: Client) -> None:
        reqs = requests[client.spec.name]
        i = 0
        while (stop is None and i < len(reqs)) or (stop is not None and not stop.is_set()):
            rec = client.run(reqs[i % len(reqs)])
            with lock:
                records.append(rec)
            i += 1

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def killer(
    ns: argparse.Namespace, servers: list[Server], clients: list[Client], done: threading.Event
) -> list[dict]:
    """ns.kills times (or until --max-minutes have passed): wait a random moment, SIGKILL a
    server that holds sessions, restart it on its port at once (the next wait starts once it
    listens, so one server always runs). The restart shares the CPU with the clients'
    reconnects to the other server: on a loaded 2-core machine a restart takes a minute, and
    waiting for the reconnects first would double the time per kill."""
    rng = random.Random(ns.seed)
    kills = []
    stop_at = time.monotonic() + 60 * ns.max_minutes if ns.max_minutes else float("inf")
    try:
        for k in range(ns.kills):
            if time.monotonic() > stop_at:
                print(f"--max-minutes reached after {k} kills", flush=True)
                break
            time.sleep(rng.uniform(ns.min_gap, ns.max_gap))
            deadline = time.monotonic() + 120
            holding: list[tuple[Server, int]] = []
            while not holding:
                if time.monotonic() > deadline:
                    raise RuntimeError("no server held a session for 120 s")
                time.sleep(0.05)
                counts = [(s, s.sessions()) for s in servers if s.alive()]
                holding = [(s, n) for s, n in counts if n > 0]
            victim, n = rng.choice(holding)
            where = {c.spec.name: c.where() for c in clients}
            t = victim.kill9()
            affected = sorted(name for name, a in where.items() if a == victim.address)
            restart = victim.start()
            kills.append(
                {
                    "kill": k,
                    "server": victim.name,
                    "t": t,
                    "sessions": n,
                    "affected": affected,
                    "restart_s": restart,
                    "load": load_average(),
                }
            )
            print(
                f"kill {k + 1}/{ns.kills}: server {victim.name} ({n} sessions; "
                f"{len(affected)} clients on it), back in {restart:.1f} s",
                flush=True,
            )
    finally:
        done.set()
    return kills


def reconnect_times(kills: list[dict], records: list[dict]) -> list[dict]:
    """For each kill and each client that had a request on the killed server: seconds from
    the kill to that client's next token (None if it never got one)."""
    chunks: dict[str, list[float]] = {}
    for r in records:
        chunks.setdefault(r["client"], []).extend(t for t, _ in r["chunks"])
    for ts in chunks.values():
        ts.sort()
    out = []
    for k in kills:
        for name in k["affected"]:
            nxt = next((t for t in chunks.get(name, []) if t > k["t"]), None)
            out.append(
                {"kill": k["kill"], "client": name, "s": None if nxt is None else nxt - k["t"]}
            )
    return out


def target_alone(ns: argparse.Namespace, requests: dict[str, list[Request]], specs) -> dict:  # noqa: ANN001
    """The target's own greedy text of every greedy request (plain decoding, this process)."""
    from specsplit.backends.load import load_backend
    from specsplit.engine.speculative import GenerationRequest, SpeculativeEngine

    target = load_backend(ns.target_backend, ns.target, n_ctx=4096)
    engine = SpeculativeEngine(target)
    out: dict[tuple, list[int]] = {}
    for spec in specs:
        if spec.temperature:
            continue
        for r in requests[spec.name]:
            key = (r.prompt, r.max_new_tokens)
            if key not in out:
                out[key] = engine.generate(
                    GenerationRequest(r.prompt_ids, r.max_new_tokens)
                ).token_ids
    return {"target": target, "ids": out}


def cmd_kill(ns: argparse.Namespace) -> dict:
    from specsplit.faces.api import load_tokenizer

    out = Path(ns.out)
    tok = load_tokenizer(ns.target)
    prompts = load_prompt_ids(ns, tok)
    specs = roster(ns)
    requests = requests_of(specs, prompts, ns.max_new_tokens)
    servers = [Server(name, serve_args(ns), out) for name in ("a", "b")]
    starts = [threading.Thread(target=s.start) for s in servers]
    for t in starts:
        t.start()
    for t in starts:
        t.join()
    addresses = [s.address for s in servers]
    clients = []
    try:
        for spec in specs:
            draft = model_drafter(ns) if spec.drafter == "model" else None
            clients.append(
                Client(spec, addresses, tok, draft=draft, retry_for=ns.retry_for, record=True)
            )
        load0 = load_average()
        t0 = time.monotonic()
        reference = run_clients(clients, requests, None)  # no kills
        t_ref = time.monotonic() - t0
        print(f"references: {len(reference)} generations in {t_ref:.0f} s", flush=True)
        stop = threading.Event()
        box: dict = {}

        def kill_loop() -> None:
            try:
                box["kills"] = killer(ns, servers, clients, stop)
            except Exception as e:  # noqa: BLE001 - raised in this thread below
                box["error"] = e

        kt = threading.Thread(target=kill_loop)
        kt.start()
        t0 = time.monotonic()
        records = run_clients(clients, requests, stop)
        kt.join()
        if "error" in box:
            raise box["error"]
        t_kill = time.monotonic() - t0
        drained = {s.name: s.drained() for s in servers}
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.stop()
    kills = box["kills"]
    alone = target_alone(ns, requests, specs)
    analyse_all(reference, records, requests, specs, alone, ns.target_backend)
    return {
        "config": {k: v for k, v in vars(ns).items() if k != "func"},
        "clients": spec_dicts(specs),
        "load_before": load0,
        "load_after": load_average(),
        "reference_seconds": t_ref,
        "kill_phase_seconds": t_kill,
        "summary": summarise(kills, reference, records, drained),
        "kills": kills,
        "reference": reference,
        "records": records,
    }


def analyse_all(
    reference: list[dict],
    records: list[dict],
    requests: dict[str, list[Request]],
    specs: list[ClientSpec],
    alone: dict,
    backend: str,
) -> None:
    """Compare every generation: greedy ones with the target alone's text, those of the kill
    phase with the same request's reference. Where one differs: the first differing position
    and how near the decision there was to going the other way (greedy: the target's top-2
    logit gap; sampled: the margin of the accept test or draw, ``decision_margin``). Drafts
    are dropped from the records afterwards."""
    from specsplit.bench.ties import TIE_TOLERANCE, top2_gap

    target = alone["target"]
    by_name = {s.name: s for s in specs}
    req_of = {(name, r.index): r for name, rs in requests.items() for r in rs}
    refs = {(r["client"], r["request"]): r for r in reference if r["error"] is None}

    def check(rec: dict, want: list[int], ref_drafts: dict | None) -> dict:
        c = compare(want, rec["ids"])
        if c["equal"] or c["position"] >= len(want):
            return c
        spec, r = by_name[rec["client"]], req_of[(rec["client"], rec["request"])]
        if spec.temperature == 0:
            c["top2_gap"] = top2_gap(target, list(r.prompt_ids) + want[: c["position"]])
            c["near_tie"] = c["top2_gap"] < TIE_TOLERANCE[backend]
        else:
            c["margin"] = decision_margin(
                target,
                spec.temperature,
                r.seed,
                r.prompt_ids,
                want,
                ref_drafts or {},
                c["position"],
            )
        return c

    for rec in reference + records:
        if rec["error"] is not None:
            continue
        spec, r = by_name[rec["client"]], req_of[(rec["client"], rec["request"])]
        if spec.temperature == 0:
            rec["vs_target_alone"] = check(rec, alone["ids"][(r.prompt, r.max_new_tokens)], None)
    for rec in records:
        ref = refs.get((rec["client"], rec["request"]))
        if rec["error"] is None and ref is not None:
            rec["vs_reference"] = check(rec, ref["ids"], ref.get("drafts"))
    for rec in reference + records:
        rec.pop("drafts", None)


def summarise(kills: list[dict], reference: list[dict], records: list[dict], drained: dict) -> dict:
    done = [r for r in records if r["error"] is None]
    vs_ref = [r["vs_reference"] for r in done if r.get("vs_reference")]
    alone = [r["vs_target_alone"] for r in reference + done if r.get("vs_target_alone")]
    rt = reconnect_times(kills, records)
    secs = [x["s"] for x in rt if x["s"] is not None]
    resumed = [r for r in done if r.get("reconnects")]
    return {
        "kills": len(kills),
        "kills_affecting_clients": sum(bool(k["affected"]) for k in kills),
        "generations": len(records),
        "failed": len(records) - len(done),
        "errors": sorted({r["error"] for r in records if r["error"]}),
        "resumed_generations": len(resumed),
        "resumed_equal_reference": sum(
            bool(r.get("vs_reference") and r["vs_reference"]["equal"]) for r in resumed
        ),
        "equal_reference": sum(c["equal"] for c in vs_ref),
        "compared_with_reference": len(vs_ref),
        "lost_tokens": sum(c["lost"] for c in vs_ref),
        "duplicated_tokens": sum(c["duplicated"] for c in vs_ref),
        "changed_generations": sum(bool(c.get("changed")) for c in vs_ref),
        "reference_differences": [
            {"client": r["client"], "request": r["request"], **r["vs_reference"]}
            for r in done
            if r.get("vs_reference") and not r["vs_reference"]["equal"]
        ],
        "reference_failed": sum(r["error"] is not None for r in reference),
        "stream_equals_result": all(r.get("stream_equals_result", True) for r in done),
        "greedy_compared_with_target_alone": len(alone),
        "greedy_equal_target_alone": sum(c["equal"] for c in alone),
        "greedy_differences": [
            {k: v for k, v in c.items() if k in ("position", "top2_gap", "near_tie")}
            for c in alone
            if not c["equal"]
        ],
        "reconnects_measured": len(secs),
        "reconnects_without_next_token": len(rt) - len(secs),
        "reconnect_median_s": statistics.median(secs) if secs else None,
        "reconnect_p99_s": pct(secs, 99),
        "reconnect_max_s": max(secs) if secs else None,
        "restart_median_s": statistics.median(k["restart_s"] for k in kills) if kills else None,
        "sessions_left_after": {k: not v for k, v in drained.items()},
    }
