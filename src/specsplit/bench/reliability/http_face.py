"""The HTTP face (`specsplit serve --http-port`) under hostile requests.

Every case is one request with the status it must get: malformed JSON (both endpoints),
huge bodies (a Content-Length past the limit, a chunked body that grows past it, a body
trickled slower than --http-body-timeout, a non-numeric Content-Length), invalid parameters
(each field of the OpenAI schema out of range or of the wrong type, unknown and unsupported
fields, ids past the vocabulary, a prompt longer than the context), wrong paths and methods;
then clients that vanish: mid-stream, before the first event, while a whole answer is being
made, and halfway through sending their body. During the one-request cases a good client
repeats a greedy and a seeded sampled request, whose texts must not change. Counted: wrong statuses, 5xx answers,
error bodies not in OpenAI's shape, server deaths, and sessions still open afterwards
(``/status`` and ``/metrics``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from specsplit.bench.reliability.common import Server, load_average, serve_args

BODY_LIMIT = 1 << 20  # the face's default max body (FaceConfig.max_body_bytes)
BODY_TIMEOUT = 2.0  # --http-body-timeout of the server under test (seconds)
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def completion(**kw: object) -> dict:
    return {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, **kw}


def chat(**kw: object) -> dict:
    return {
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "temperature": 0,
        **kw,
    }


def cases(vocab: int, model: str) -> list[dict]:
    """(name, path, body bytes, extra headers, expected status) of the one-request cases."""
    out: list[dict] = []

    def add(name: str, path: str, body: bytes | dict, status: int, method: str = "POST") -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        out.append({"name": name, "path": path, "body": raw, "status": status, "method": method})

    malformed = {
        "empty": b"",
        "open brace": b"{",
        "not json": b"not json",
        "array": b"[]",
        "string": b'"x"',
        "null": b"null",
        "number": b"1",
        "missing value": b'{"prompt": }',
        "trailing garbage": b'{"prompt": "a"}{',
        "invalid utf-8": b'{"prompt": "\xff\xfe"}',
        "NaN": b'{"prompt": "a", "temperature": NaN}',
        "Infinity": b'{"prompt": "a", "temperature": Infinity}',
        "1e400": b'{"prompt": "a", "temperature": 1e400}',
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "nul bytes": b"\x00" * 64,
        "single quotes": b"{'prompt': 'a'}",
    }
    for path in (COMPLETIONS, CHAT):
        for name, body in malformed.items():
            add(f"malformed json: {name}", path, body, 400)
    bad_common = {
        "max_tokens": [0, -1, 1.5, "4", True, 10**30, 4097],
        "temperature": [-0.1, 100.5, "hot", True, [1]],
        "top_p": [0, 1.5, -1, "0.9"],
        "top_k": [-2, 1.5, "5"],
        "min_p": [1, 1.5, -0.1],
        "seed": [-1, 2**63, "1", 1.0],
        "stop": [["a", "b", "c", "d", "e"], [1], 3, {"a": 1}],
        "n": [2, 0, "1"],
        "stream": ["yes", 1],
        "stream_options": ["x", {"include_usage": "yes"}, {"other": True}],
        "logprobs": [True],
        "logit_bias": [{"1": 5}],
        "best_of": [2],
        "tools": [[{"type": "function"}]],
        "user": [5],
        "metadata": [{"a": 1}],
        "unknown_field": [1],
    }
    for field, values in bad_common.items():
        for v in values:
            add(f"param {field}={json.dumps(v)[:30]}", COMPLETIONS, completion(**{field: v}), 400)
            add(f"param {field}={json.dumps(v)[:30]}", CHAT, chat(**{field: v}), 400)
    for v in ([], [-1], [vocab], [vocab + 10**6], ["a"], 5, None, [1.0], [[1]], {"a": 1}):
        add(f"prompt={json.dumps(v)[:30]}", COMPLETIONS, completion(prompt=v), 400)
    add("prompt missing", COMPLETIONS, {"max_tokens": 4}, 400)
    add("prompt past the context", COMPLETIONS, completion(prompt="word " * 5000), 400)
    add("prompt ids past the context", COMPLETIONS, completion(prompt=[1] * 5000), 400)
    bad_messages = [
        [],
        "hi",
        [{"content": "x"}],
        [{"role": "", "content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}],
        [{"role": "user", "content": "x", "extra": 1}],
        [{"role": "user", "content": "word " * 5000}],
        None,
    ]
    for v in bad_messages:
        add(f"messages={json.dumps(v)[:30]}", CHAT, chat(messages=v), 400)
    add("max_completion_tokens=0", CHAT, chat(max_completion_tokens=0), 400)
    for path, body in ((COMPLETIONS, completion()), (CHAT, chat())):
        add("model not served", path, {**body, "model": "gpt-4"}, 404)
        add("model of the wrong type", path, {**body, "model": 5}, 400)
        add(f"GET {path}", path, b"", 405, method="GET")
        add(f"PUT {path}", path, body, 405, method="PUT")
        add("body past the limit", path, {**body, "user": "x" * (BODY_LIMIT + 10)}, 413)
        add("valid", path, body, 200)  # among the bad ones: the server still serves
        add("valid, model named", path, {**body, "model": model}, 200)
    add("unknown path", "/v1/nothing", completion(), 404)
    add("unknown path GET", "/v2/models", b"", 404, method="GET")
    return out


# ---- sending ----


def request(
    port: int,
    method: str,
    path: str,
    body: bytes,
    headers: dict | None = None,
    timeout: float = 120.0,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body if method != "GET" else None, headers=hdrs)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, *, trickle: float = 0.0, timeout: float = 60.0) -> int:
    """Send raw bytes (one byte every `trickle` seconds if set); the status line's code (0 if
    the connection closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            if trickle:
                for b in data:
                    s.sendall(bytes([b]))
                    time.sleep(trickle)
            else:
                s.sendall(data)
        except OSError:
            pass  # the server may answer and close before the whole body is sent
        reply = b""
        try:
            while b"\r\n" not in reply:
                got = s.recv(4096)
                if not got:
                    break
                reply += got
        except OSError:
            pass
    try:
        return int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def head(path: str, length: str | int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def transport_cases(port: int) -> list[dict]:
    """Cases that need the raw connection: sizes and timings of the body itself."""
    out = []
    body = json.dumps(completion()).encode()
    got = raw_exchange(port, head(COMPLETIONS, 10**12))
    out.append({"name": "Content-Length 10**12, no body", "status": 413, "got": got})
    got = raw_exchange(port, head(COMPLETIONS, "abc") + body)
    out.append({"name": "Content-Length not a number", "status": 400, "got": got})
    got = raw_exchange(port, head(COMPLETIONS, -5) + body)
    out.append({"name": "Content-Length negative", "status": 400, "got": got})
    chunk = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(BODY_LIMIT // 65536 + 4))
    data = (
        f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunks
    out.append(
        {"name": "chunked body past the limit", "status": 413, "got": raw_exchange(port, data)}
    )
    # a body trickled slower than the body timeout: 408
    got = raw_exchange(port, head(COMPLETIONS, len(body)) + body, trickle=0.1)
    out.append(
        {"name": f"body trickled ({len(body)} bytes, 0.1 s each)", "status": 408, "got": got}
    )
    # a body that never comes whole: 408 when the timeout passes
    got = raw_exchange(port, head(COMPLETIONS, len(body) + 100) + body)
    out.append({"name": "body shorter than its Content-Length", "status": 408, "got": got})
    return out


# ---- clients that vanish ----


def vanish(port: int, how: str, max_tokens: int) -> None:
    """One request whose client goes away (how: mid-stream, before-first-event, whole,
    half-body)."""
    stream = how in ("mid-stream", "before-first-event")
    body = json.dumps(chat(max_tokens=max_tokens, stream=stream, temperature=0.8)).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        if how == "half-body":
            s.sendall(head(CHAT, len(body)) + body[: len(body) // 2])
            time.sleep(0.2)
            return
        s.sendall(head(CHAT, len(body)) + body)
        if how == "before-first-event":
            time.sleep(0.05)
            return
        if how == "whole":
            time.sleep(1.0)  # the generation is under way (max_tokens is large)
            return
        got = b""  # mid-stream: read some events, then go
        while got.count(b"data:") < 3:
            more = s.recv(4096)
            if not more:
                break
            got += more
    finally:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # a reset, as a client that dies


def open_sessions(server: Server) -> dict:
    """Sessions the server holds now, by /status and by /metrics."""
    status = json.loads(request(server.http_port, "GET", "/status", b"")[1])
    return {"status": int(status["sessions"]), "metrics": int(server.metrics()["sessions"])}


def wait_drained(server: Server, timeout: float = 60.0) -> tuple[dict, float]:
    t0 = time.monotonic()
    while True:
        now = open_sessions(server)
        if not any(now.values()) or time.monotonic() - t0 > timeout:
            return now, time.monotonic() - t0
        time.sleep(0.25)


# ---- checks ----


def error_shape(status: int, body: bytes) -> bool:
    """An error answer is OpenAI's {"error": {"message", "type", ...}} with one line."""
    if status < 400 or status == 499:
        return True
    try:
        err = json.loads(body)["error"]
        return isinstance(err["message"], str) and bool(err["message"]) and "type" in err
    except (ValueError, KeyError, TypeError):
        return False


class Good:
    """Repeats a greedy and a seeded sampled chat request; every text must equal the first."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.texts: dict[str, Counter] = {"greedy": Counter(), "seeded": Counter()}
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        bodies = {
            "greedy": chat(max_tokens=24),
            "seeded": chat(max_tokens=24, temperature=0.8, seed=7),
        }
        while not self.stop.is_set():
            for name, body in bodies.items():
                try:
                    status, data = request(self.port, "POST", CHAT, json.dumps(body).encode())
                except OSError as e:
                    self.failures.append(f"{name}: {e}")
                    continue
                if status != 200:
                    self.failures.append(f"{name}: {status} {data[:200]!r}")
                    continue
                text = json.loads(data)["choices"][0]["message"]["content"]
                self.texts[name][text] += 1


def cmd_http(ns: argparse.Namespace) -> dict:
    from specsplit.faces.api import load_tokenizer

    out = Path(ns.out)
    tok = load_tokenizer(ns.target)
    server = Server("http", serve_args(ns, "--http-body-timeout", str(BODY_TIMEOUT)), out)
    server.start()
    results: list[dict] = []
    deaths = 0
    good = Good(server.http_port)
    try:
        good_thread = threading.Thread(target=good.run, daemon=True)
        good_thread.start()
        t0 = time.monotonic()
        one = cases(tok.vocab_size, ns.target)
        for r in range(ns.rounds):
            for c in one:
                try:
                    status, body = request(server.http_port, c["method"], c["path"], c["body"])
                except OSError as e:
                    status, body = 0, str(e).encode()
                results.append(
                    {
                        "round": r,
                        "name": c["name"],
                        "path": c["path"],
                        "bytes": len(c["body"]),
                        "status": c["status"],
                        "got": status,
                        "shape": error_shape(status, body),
                        "details": body[:200].decode("utf-8", "replace"),
                    }
                )
                if not server.alive():
                    deaths += 1
                    server.start()
            for c in transport_cases(server.http_port):
                results.append({"round": r, "path": COMPLETIONS, "shape": True, **c})
        t_cases = time.monotonic() - t0
        good.stop.set()  # its own sessions would count as open ones below
        good_thread.join()
        after_cases = wait_drained(server)
        vanished: Counter = Counter()
        drains = {}
        for how in ("mid-stream", "before-first-event", "whole", "half-body"):
            for _ in range(ns.vanish):
                try:
                    vanish(server.http_port, how, ns.max_new_tokens)
                    vanished[how] += 1
                except OSError as e:
                    results.append({"name": f"vanish {how}", "status": 0, "got": str(e)})
            drains[how] = wait_drained(server)
        final = wait_drained(server)
        status_doc = json.loads(request(server.http_port, "GET", "/status", b"")[1])
        alive = server.alive()
    finally:
        good.stop.set()
        server.stop()
    wrong = [x for x in results if x["got"] != x["status"]]
    summary = {
        "requests": len(results),
        "wrong_status": len(wrong),
        "server_errors_5xx": sum(isinstance(x["got"], int) and x["got"] >= 500 for x in results),
        "bad_error_bodies": sum(not x["shape"] for x in results),
        "by_expected_status": dict(Counter(str(x["status"]) for x in results)),
        "server_deaths": deaths,
        "server_alive": alive,
        "case_seconds": t_cases,
        "sessions_after_cases": after_cases[0],
        "clients_vanished": dict(vanished),
        "sessions_after_vanishing": {k: v[0] for k, v in drains.items()},
        "drain_seconds": {k: round(v[1], 2) for k, v in drains.items()},
        "sessions_left_after": final[0],
        "refused_counter": status_doc.get("refused"),
        "good_requests": sum(sum(c.values()) for c in good.texts.values()),
        "good_distinct_texts": {k: len(v) for k, v in good.texts.items()},
        "good_failures": len(good.failures),
        "wrong": [
            {k: x.get(k) for k in ("name", "path", "status", "got", "details")} for x in wrong
        ][:50],
    }
    return {
        "config": {k: v for k, v in vars(ns).items() if k != "func"},
        "body_timeout": BODY_TIMEOUT,
        "load_after": load_average(),
        "summary": summary,
        "results": results,
        "good_texts": {k: dict(v) for k, v in good.texts.items()},
        "good_failures": good.failures[:20],
    }
