"""Protocol fuzzing against a running server while good sessions generate.

--messages hostile messages (``fuzz_cases``: made from the .proto's descriptors with a fixed
seed, each with the status it must get) go to one `specsplit serve` one RPC at a time, sent as
raw bytes; meanwhile edge and cloud-only clients run their requests in a loop and must produce
exactly the texts they produced before the fuzzing began. Counted: status mismatches,
INTERNAL or UNKNOWN answers, hangs (an RPC past its deadline), server deaths, sessions left
open at the end, and any good text that changed.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from specsplit.bench.reliability.common import (
    Client,
    ClientSpec,
    Server,
    compare,
    load_average,
    load_prompt_ids,
    model_drafter,
    serve_args,
    spec_dicts,
)
from specsplit.bench.reliability.fuzz_cases import IA, OK, RE, Case, Limits, Maker, parse
from specsplit.bench.reliability.kill import requests_of, run_clients
from specsplit.transport import wire
from specsplit.transport.pb import specsplit_pb2 as pb

MAX_SESSIONS, MAX_DRAFT, KV_BUDGET = 32, 8, "64MiB"
SERVICE = "/specsplit.v1.Verifier/"
SAME = lambda b: b  # noqa: E731 - raw bytes both ways


class Raw:
    """RPCs of the Verifier service with raw bytes (no serializer), on one channel."""

    def __init__(self, address: str, deadline: float) -> None:
        opts = [
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
        self.channel = grpc.insecure_channel(address, options=opts)
        self.deadline = deadline

    def call(
        self, rpc: str, msgs: list[bytes], read: int | None = None
    ) -> tuple[str, str, list[bytes]]:
        """(status name, details, answers); a streaming answer is cancelled after `read` chunks
        (its status is then OK: nothing went wrong before)."""
        out: list[bytes] = []
        path = SERVICE + rpc
        try:
            if rpc == "Handshake":
                f = self.channel.unary_unary(
                    path, request_serializer=SAME, response_deserializer=SAME
                )
                out.append(f(msgs[0], timeout=self.deadline))
            elif rpc in ("Generate", "Vocabulary"):
                f = self.channel.unary_stream(
                    path, request_serializer=SAME, response_deserializer=SAME
                )
                call = f(msgs[0], timeout=self.deadline)
                for m in call:
                    out.append(m)
                    if read is not None and len(out) >= read:
                        call.cancel()
                        break
            else:
                f = self.channel.stream_stream(
                    path, request_serializer=SAME, response_deserializer=SAME
                )
                out.extend(f(iter(msgs), timeout=self.deadline))
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", out
        return OK, "", out

    def stream(self, first: bytes | None) -> tuple[queue.Queue, grpc.Call]:
        """An open Session call: (its request queue, the call); None in the queue half-closes."""
        q: queue.Queue = queue.Queue()
        if first is not None:
            q.put(first)
        f = self.channel.stream_stream(
            SERVICE + "Session", request_serializer=SAME, response_deserializer=SAME
        )
        return q, f(iter(q.get, None), timeout=self.deadline)

    def close(self) -> None:
        self.channel.close()


def ended(call: grpc.Call) -> tuple[str, str]:
    """Drain a call; how it ended."""
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    return OK, ""


def judge(case: Case, code: str, details: str, answers: list[bytes], lim: Limits) -> str:
    """'' if the call ended as the case expects; otherwise what went wrong."""
    if code in ("INTERNAL", "UNKNOWN"):
        return "internal"
    if code == "DEADLINE_EXCEEDED":
        return "hang"
    if code != case.expect:
        return "status"
    if code != OK:
        if not details.strip() or "\n" in details:
            return "reason"
        if (code == RE) and details.startswith(wire.FULL) != case.full:
            return "reason"
        return ""
    return check_answers(case, answers, lim)


def check_answers(case: Case, answers: list[bytes], lim: Limits) -> str:
    """The answers of a call that succeeded make sense."""
    if case.rpc == "Generate":
        chunks = [pb.GenerateChunk.FromString(a) for a in answers]
        if any(t >= lim.vocab for c in chunks for t in c.token_ids):
            return "answer"
        return ""
    if case.rpc != "Session" or not answers:
        return ""
    msgs = [pb.ServerMsg.FromString(a) for a in answers]
    sent = parse(pb.ClientMsg, case.msgs[0]) if case.msgs else None
    first = bool(sent is not None and sent.open.first_token)  # the Open asked for it
    opened = msgs[0].opened
    if msgs[0].WhichOneof("msg") != "opened" or opened.version != int(first):
        return "answer"  # a session starts at version 0, or 1 with the prefill's first token
    if first and not (opened.HasField("first_token") and opened.first_token < lim.vocab):
        return "answer"
    version = int(first)
    for m in msgs[1:]:
        v = m.verdict
        if m.WhichOneof("msg") != "verdict" or v.version != version + (not v.dropped):
            return "answer"
        if not v.dropped and v.next_token >= lim.vocab:
            return "answer"
        version = v.version
    return ""


class Turns:
    """Cases run side by side; a flood runs alone (it fills the server on purpose)."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.running = 0
        self.alone = False

    def enter(self, alone: bool) -> None:
        with self.cv:
            if alone:
                self.cv.wait_for(lambda: not self.alone)
                self.alone = True
                self.cv.wait_for(lambda: self.running == 0)
            else:
                self.cv.wait_for(lambda: not self.alone)
            self.running += 1

    def leave(self, alone: bool) -> None:
        with self.cv:
            self.running -= 1
            if alone:
                self.alone = False
            self.cv.notify_all()


class Fuzzer:
    """Plays cases against the server and keeps the counts (from several threads)."""

    def __init__(self, server: Server, lim: Limits, maker: Maker, deadline: float) -> None:
        self.server, self.lim, self.maker = server, lim, maker
        self.raw = Raw(server.address, deadline)
        self.counts: Counter = Counter()  # (family kind, expected, got) -> messages
        self.problems: Counter = Counter()
        self.examples: list[dict] = []
        self.messages = 0
        self.deaths = 0
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def note(self, case: Case, got: str, details: str, problem: str, n: int = 1) -> None:
        with self.lock:
            self._note(case, got, details, problem, n)

    def _note(self, case: Case, got: str, details: str, problem: str, n: int) -> None:
        self.messages += n
        if self.messages % 250 == 0:
            print(
                f"{self.messages} messages, problems {dict(self.problems)}, "
                f"{time.monotonic() - self.t0:.0f} s",
                flush=True,
            )
        kind = case.family.split(":")[0].split(" ")[0] if case.rpc not in ("join",) else "join"
        if case.rpc.startswith("flood"):
            kind = case.rpc
        self.counts[(kind, case.expect + (" full" if case.full else ""), got)] += n
        if problem:
            self.problems[problem] += n
            if len(self.examples) < 100:
                self.examples.append(
                    {
                        "family": case.family,
                        "rpc": case.rpc,
                        "expected": case.expect,
                        "full": case.full,
                        "got": got,
                        "details": details[:300],
                        "problem": problem,
                        "sizes": [len(m) for m in case.msgs],
                    }
                )

    def play(self, case: Case) -> None:
        if case.rpc == "join":
            self.join(case)
        elif case.rpc == "flood-open":
            self.flood_open(case)
        elif case.rpc == "flood-silent":
            self.flood_silent(case)
        else:
            read = 3 if case.rpc in ("Generate", "Vocabulary") else None
            code, details, answers = self.raw.call(case.rpc, case.msgs, read)
            self.note(case, code, details, judge(case, code, details, answers, self.lim))
        with self.lock:
            if not self.server.alive():
                self.deaths += 1
                self.problems["server death"] += 1
                self.server.start()

    def join(self, case: Case) -> None:
        owner_open = pb.ClientMsg(open=self.maker.open_msg(False)).SerializeToString()
        q, owner = self.raw.stream(owner_open)
        try:
            opened = pb.ServerMsg.FromString(next(owner)).opened
            how = case.family.split(": ")[1]
            join = pb.Open(
                join_session_id=opened.session_id,
                join_token=opened.join_token
                if how != "wrong join token"
                else "x" + opened.join_token,
                tokenizer_fingerprint=self.lim.fingerprint if how != "wrong tokenizer" else "nope",
            )
            msgs = [pb.ClientMsg(open=join).SerializeToString()]
            code, details, answers = self.raw.call("Session", msgs)
            problem = judge(case, code, details, [], self.lim)
            if not problem and code == OK:
                got = pb.ServerMsg.FromString(answers[0]).opened if answers else None
                if got is None or got.session_id != opened.session_id or got.join_token:
                    problem = "answer"
            self.note(case, code, details, problem)
        except (grpc.RpcError, StopIteration) as e:
            self.note(case, "owner failed", str(e), "owner")
        finally:
            q.put(None)
            ended(owner)

    def flood_open(self, case: Case) -> None:
        """Opens without rounds, all held at once: every one is opened or refused "server
        full", never more opened than the server's sessions, at least the excess refused."""
        n = self.lim.max_sessions + 4
        calls = [
            self.raw.stream(pb.ClientMsg(open=self.maker.open_msg(False)).SerializeToString())
            for _ in range(n)
        ]
        got = []
        for _, call in calls:
            try:
                msg = pb.ServerMsg.FromString(next(call))
                got.append((OK if msg.WhichOneof("msg") == "opened" else "answer", ""))
            except grpc.RpcError as e:
                got.append((e.code().name, e.details() or ""))
            except StopIteration:
                got.append(("ended", ""))
        for q, _ in calls:
            q.put(None)
        for _, call in calls:
            ended(call)
        opened = sum(c == OK for c, _ in got)
        full = sum(c == RE and d.startswith(wire.FULL) for c, d in got)
        spread = opened <= self.lim.max_sessions and full >= n - self.lim.max_sessions
        for code, details in got:
            fine = code == OK or (code == RE and details.startswith(wire.FULL))
            self.note(case, code, details, "" if fine and spread else "status")
        self._settle()

    def flood_silent(self, case: Case) -> None:
        """Streams that send nothing for a second, then half-close: refused "server full"
        past the stream limit at once, the others then refused for a missing Open."""
        n = self.lim.max_streams + 4
        calls = [self.raw.stream(None) for _ in range(n)]
        time.sleep(1.0)
        for q, _ in calls:
            q.put(None)
        got = [ended(call) for _, call in calls]
        full = sum(c == RE and d.startswith(wire.FULL) for c, d in got)
        for code, details in got:
            fine = (code == RE and details.startswith(wire.FULL)) or (
                code == IA and "first message must be Open" in details
            )
            self.note(case, code, details, "" if fine and full >= 4 else "status")
        self._settle()

    def _settle(self, timeout: float = 30.0) -> None:
        """Wait for the flood's sessions to end (so later cases are not refused as full)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.server.sessions() > 4:
            time.sleep(0.1)


def measure_kv_per_token(server: Server, fingerprint: str, prompt: list[int]) -> int:
    """KV bytes per token as the server counts them: one session's cache over its size (the
    prompt but its last token), read from /metrics while it is the only one."""
    raw = Raw(server.address, 60.0)
    first = pb.ClientMsg(
        open=pb.Open(prompt_ids=prompt, tokenizer_fingerprint=fingerprint)
    ).SerializeToString()
    q, call = raw.stream(first)
    try:
        next(call)
        return int(server.metrics()["kv_bytes"]) // (len(prompt) - 1)
    finally:
        q.put(None)
        ended(call)
        raw.close()


def play_all(
    fuzzer: Fuzzer, maker: Maker, messages: int, threads: int, minutes: float | None = None
) -> None:
    """Cases from the maker (in its seeded order) until they hold `messages` hostile messages
    or `minutes` have passed (no new case starts after it), played by `threads` threads at
    once."""
    lock, turns = threading.Lock(), Turns()
    planned = 0
    stop_at = time.monotonic() + 60 * minutes if minutes else float("inf")

    def take() -> Case | None:
        nonlocal planned
        with lock:
            if planned >= messages or time.monotonic() > stop_at:
                return None
            case = maker.next()
            planned += {"flood-open": maker.lim.max_sessions + 4}.get(case.rpc, 1)
            planned += (maker.lim.max_streams + 3) * (case.rpc == "flood-silent")
            return case

    def work() -> None:
        while (case := take()) is not None:
            alone = case.rpc.startswith("flood")
            turns.enter(alone)
            try:
                fuzzer.play(case)
            finally:
                turns.leave(alone)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def cmd_fuzz(ns: argparse.Namespace) -> dict:
    from specsplit.faces.api import load_tokenizer
    from specsplit.faces.serve import parse_size
    from specsplit.transport.link import Link

    out = Path(ns.out)
    tok = load_tokenizer(ns.target)
    prompts = load_prompt_ids(ns, tok)
    extra = ("--max-sessions", str(MAX_SESSIONS), "--max-draft", str(MAX_DRAFT))
    server = Server("fuzz", serve_args(ns, *extra, "--kv-budget", KV_BUDGET), out)
    server.start()
    specs = [
        ClientSpec("good0-greedy-ngram", "ngram"),
        ClientSpec("good1-sampled-model", "model", ns.temperature, ns.k),
        ClientSpec("good2-cloud-greedy", "none"),
        ClientSpec("good3-cloud-sampled", "none", ns.temperature),
    ]
    requests = requests_of(specs, prompts, ns.max_new_tokens)
    clients: list[Client] = []
    try:
        link = Link(server.address, tok.fingerprint(), None, None, None, 30.0)
        w = link.welcome
        link.close()
        kv_per_token = measure_kv_per_token(server, tok.fingerprint(), prompts[0][1])
        lim = Limits(
            vocab=w.vocab_size,
            n_ctx=w.n_ctx,
            max_draft=w.max_draft,
            kv_tokens=parse_size(KV_BUDGET) // kv_per_token,
            max_sessions=MAX_SESSIONS,
            max_streams=2 * MAX_SESSIONS,
            fingerprint=w.tokenizer_fingerprint,
            identity=w.target_identity,
        )

        def count(text: str) -> int:
            rendered = tok.apply_chat_template([{"role": "user", "content": text}])
            return len(tok.encode(rendered, add_special=False))

        maker = Maker(lim, [ids[:40] for _, ids in prompts], count, ns.seed)
        for spec in specs:
            draft = model_drafter(ns) if spec.drafter == "model" else None
            clients.append(Client(spec, [server.address], tok, draft=draft, retry_for=120.0))
        reference = run_clients(clients, requests, None)
        print(f"references: {len(reference)} generations", flush=True)
        rss0, load0 = server.rss(), load_average()
        stop = threading.Event()
        box: dict = {}
        good = threading.Thread(
            target=lambda: box.update(records=run_clients(clients, requests, stop))
        )
        good.start()
        fuzzer = Fuzzer(server, lim, maker, ns.deadline)
        t0 = time.monotonic()
        try:
            play_all(fuzzer, maker, ns.messages, ns.threads, ns.max_minutes)
        finally:
            stop.set()
            good.join()
        t_fuzz = time.monotonic() - t0
        drained = server.drained()
        rss1 = server.rss() if server.alive() else None
        fuzzer.raw.close()
    finally:
        for c in clients:
            c.close()
        server.stop()
    records = box.get("records", [])
    refs = {(r["client"], r["request"]): r["ids"] for r in reference if r["error"] is None}
    for r in records:
        want = refs.get((r["client"], r["request"]))
        r["vs_reference"] = compare(want, r["ids"]) if want is not None and not r["error"] else None
        r.pop("drafts", None)
    for r in reference:
        r.pop("drafts", None)
    compared = [r for r in records if r["vs_reference"]]
    summary = {
        "messages": fuzzer.messages,
        "messages_asked": ns.messages,
        "stopped_by_time": fuzzer.messages < ns.messages,
        "seconds": t_fuzz,
        "mismatches": sum(fuzzer.problems.values()),
        "problems": dict(fuzzer.problems),
        "internal_or_unknown": fuzzer.problems["internal"],
        "hangs": fuzzer.problems["hang"],
        "server_deaths": fuzzer.deaths,
        "by_expected_status": _by(fuzzer.counts, 1),
        "by_kind": _by(fuzzer.counts, 0),
        "sessions_left_after": not drained,
        "good_generations": len(records),
        "good_failed": sum(r["error"] is not None for r in records),
        "good_equal_reference": sum(r["vs_reference"]["equal"] for r in compared),
        "good_compared": len(compared),
        "good_differences": [
            {"client": r["client"], "request": r["request"], **r["vs_reference"]}
            for r in compared
            if not r["vs_reference"]["equal"]
        ],
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
    }
    return {
        "config": {k: v for k, v in vars(ns).items() if k != "func"},
        "server": {"max_sessions": MAX_SESSIONS, "max_draft": MAX_DRAFT, "kv_budget": KV_BUDGET},
        "limits": vars(lim),
        "clients": spec_dicts(specs),
        "load_before": load0,
        "load_after": load_average(),
        "summary": summary,
        "counts": [
            {"kind": k, "expected": e, "got": g, "messages": n}
            for (k, e, g), n in sorted(fuzzer.counts.items())
        ],
        "examples": fuzzer.examples,
        "reference": reference,
        "records": records,
    }


def _by(counts: Counter, i: int) -> dict:
    out: Counter = Counter()
    for key, n in counts.items():
        out[key[i]] += n
    return dict(out)
