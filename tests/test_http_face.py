"""The OpenAI-style HTTP face (FastAPI on uvicorn), end to end over real sockets on a tiny
in-process model: every endpoint, validation, limits, errors, auth, logs, disconnects."""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from conftest import TinyTokenizer, tiny_llama
from specsplit.backends.torch_backend import TorchBackend
from specsplit.engine.metrics import GenerationStats
from specsplit.engine.speculative import (
    Chunk,
    GenerationRequest,
    GenerationResult,
    SpeculativeEngine,
)
from specsplit.errors import ConfigError, Overloaded
from specsplit.proposers.ngram import NGramProposer
from specsplit.transport.http_face import FaceConfig, HTTPFace, create_app

VOCAB = 300
PROMPT = "hello world hello"
MODEL = "tiny-llama"


# ---- fixtures and helpers ----


@pytest.fixture(scope="module")
def tok() -> TinyTokenizer:
    return TinyTokenizer(VOCAB)


@pytest.fixture(scope="module")
def target(tok) -> TorchBackend:
    return TorchBackend(tiny_llama(vocab=VOCAB, seed=0), tok)


@pytest.fixture(scope="module")
def reference(target):
    """The engine's own greedy result (plain decoding, no drafter), cached by (ids, n)."""
    cache: dict = {}

    def ref(ids: list[int], n: int) -> GenerationResult:
        key = (tuple(ids), n)
        if key not in cache:
            cache[key] = SpeculativeEngine(target).generate(GenerationRequest(ids, n))
        return cache[key]

    return ref


class Up:
    """A collector with one gauge, to see /metrics serve a registry."""

    def collect(self):
        yield GaugeMetricFamily("specsplit_up", "Up.", value=1)


def serve(generate, tok, name: str = MODEL, **kw) -> HTTPFace:
    """A face on a free loopback port (use as a context manager)."""
    registry, health = kw.pop("registry", None), kw.pop("health", None)
    config = FaceConfig(**{"max_tokens_limit": 512, **kw})
    return HTTPFace(create_app(generate, tok, name, config, registry=registry, health=health))


@pytest.fixture(scope="module")
def face(target, tok):
    engine = SpeculativeEngine(target, [NGramProposer()], k=4)
    registry = CollectorRegistry()
    registry.register(Up())
    f = serve(
        engine.stream, tok, n_ctx=target.n_ctx, registry=registry, health=lambda: {"model": MODEL}
    )
    f.start()
    yield f
    f.stop()


def call(face, method, path, body=None, headers=None, raw=None):
    """One request on a fresh connection -> (status, headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", face.port, timeout=30)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def post(face, path, body, headers=None):
    status, _, data = call(face, "POST", path, body, headers)
    return status, json.loads(data)


def events(data: bytes) -> list:
    """Server-sent events -> their data payloads (JSON-decoded, except [DONE])."""
    out = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_error(status, body, want_status, want_type="invalid_request_error"):
    assert status == want_status, body
    err = body["error"]
    assert err["type"] == want_type
    assert isinstance(err["message"], str) and err["message"]
    assert "\n" not in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def log_lines(caplog, part: str) -> list[str]:
    """The request log lines containing part (the server logs just after answering)."""
    for _ in range(200):
        lines = [r.getMessage() for r in caplog.records if r.name == "specsplit.http"]
        if any(part in m for m in lines):
            break
        time.sleep(0.01)
    return [m for m in lines if part in m]


GOOD = {"prompt": "abc", "max_tokens": 2, "temperature": 0}


def assert_alive(face):
    status, body = post(face, "/v1/completions", GOOD)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 2


# ---- GET endpoints ----


def test_health_models_metrics_page(face):
    status, _, data = call(face, "GET", "/health")
    assert status == 200 and json.loads(data) == {"status": "ok", "model": MODEL}
    status, _, data = call(face, "GET", "/v1/models")
    body = json.loads(data)
    assert status == 200 and body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [(MODEL, "model")]
    status, headers, data = call(face, "GET", "/metrics")
    assert status == 200 and "specsplit_up 1.0" in data.decode()
    assert headers["Content-Type"].startswith("text/plain; version=")
    status, headers, data = call(face, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/page/page.js" in data
    for asset, kind in (("page.js", "javascript"), ("page.css", "text/css")):
        status, headers, _ = call(face, "GET", f"/page/{asset}")
        assert status == 200 and kind in headers["Content-Type"]


def test_metrics_and_status_404_without_them(tok):
    with serve(lambda req: iter(()), tok) as f:
        for path in ("/metrics", "/status"):
            status, _, data = call(f, "GET", path)
            assert_error(status, json.loads(data), 404)


# ---- completions ----


def test_greedy_completion_equals_engine(face, tok, reference):
    ref = reference(tok.encode(PROMPT), 24)
    status, body = post(
        face, "/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    )
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice == {"index": 0, "text": ref.text, "finish_reason": "length", "logprobs": None}
    n_prompt = len(tok.encode(PROMPT))
    assert body["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": 24,
        "total_tokens": n_prompt + 24,
    }
    assert body["specsplit"]["new_tokens"] == 24 and "acceptance_rate" in body["specsplit"]


def test_token_id_prompt_equals_text_prompt(face, tok, reference):
    ids = tok.encode(PROMPT)
    status, body = post(
        face, "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0}
    )
    assert status == 200 and body["choices"][0]["text"] == reference(ids, 12).text


def test_streamed_completion_adds_up(face, tok, reference):
    ref = reference(tok.encode(PROMPT), 30)
    req = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stream": True}
    status, headers, data = call(face, "POST", "/v1/completions", req)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    evs = events(data)
    assert evs[-1] == "[DONE]"
    final, pieces = evs[-2], evs[:-2]
    assert pieces and all(
        e["choices"][0]["text"] and e["object"] == "text_completion" for e in pieces
    )
    assert all(e["choices"][0]["finish_reason"] is None for e in pieces)
    assert "".join(e["choices"][0]["text"] for e in pieces) == ref.text
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == len(ref.token_ids) == 30
    assert final["usage"]["prompt_tokens"] == len(tok.encode(PROMPT))
    assert final["specsplit"]["new_tokens"] == 30 and "tokens_per_s" in final["specsplit"]
    assert len({e["id"] for e in evs[:-1]}) == 1


def test_streamed_pieces_carry_token_origins_and_counters(face):
    """The extension the page reads: each piece's spans join to its text, each span names
    how its token came, and the counters grow to the final statistics."""
    req = {"prompt": "abcabcabcabcabcabc", "max_tokens": 40, "temperature": 0, "stream": True}
    evs = events(call(face, "POST", "/v1/completions", req)[2])
    pieces, final = evs[:-2], evs[-2]
    origins = set()
    for e in pieces:
        ext = e["specsplit"]
        assert "".join(s["text"] for s in ext["spans"]) == e["choices"][0]["text"]
        origins |= {s["origin"] for s in ext["spans"]}
        assert ext["target_passes"] >= 1 and ext["proposed"] >= ext["accepted"] >= 0
    assert origins <= {"accepted:ngram", "correction", "bonus", "target"}
    assert [e["specsplit"]["new_tokens"] for e in pieces] == sorted(
        e["specsplit"]["new_tokens"] for e in pieces
    )
    stats = final["specsplit"]
    assert pieces[-1]["specsplit"]["new_tokens"] == stats["new_tokens"]
    assert pieces[-1]["specsplit"]["accepted"] == stats["accepted"]
    kinds = {o.split(":")[0] for o in origins}
    assert len(kinds) >= 2  # (this model and prompt: accepted, correction and target)
    assert ("accepted" in kinds) == (stats["accepted"] > 0)


def test_stream_options_include_usage_adds_a_usage_chunk(face):
    req = {**GOOD, "stream": True, "stream_options": {"include_usage": True}}
    evs = events(call(face, "POST", "/v1/completions", req)[2])
    assert evs[-1] == "[DONE]"
    assert evs[-2]["choices"] == [] and evs[-2]["usage"]["completion_tokens"] == 2
    assert evs[-3]["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_text(face, tok, reference):
    full = reference(tok.encode(PROMPT), 40).text
    stop = full[10:12]
    expected = full[: full.index(stop)]
    req = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": [stop, "zzzzzz"]}
    status, body = post(face, "/v1/completions", req)
    assert status == 200
    assert body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"
    _, _, data = call(face, "POST", "/v1/completions", {**req, "stop": stop, "stream": True})
    evs = events(data)
    assert "".join(e["choices"][0]["text"] for e in evs[:-1]) == expected
    assert evs[-2]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_gives_length(face):
    for n in (1, 5):
        status, body = post(
            face, "/v1/completions", {"prompt": "abc", "max_tokens": n, "temperature": 0}
        )
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        assert len(body["choices"][0]["text"]) == n == body["usage"]["completion_tokens"]


@pytest.mark.parametrize("seed", [0, 7])
def test_a_seeded_request_replays(face, seed):
    """Default temperature (1) samples; the same seed gives the same text, seed 0 included."""
    req = {"prompt": PROMPT, "max_tokens": 16, "seed": seed}
    bodies = [post(face, "/v1/completions", req)[1] for _ in range(2)]
    assert bodies[0]["choices"][0]["text"] == bodies[1]["choices"][0]["text"]
    assert bodies[0]["specsplit"]["seed"] == seed


def test_model_must_be_the_served_one(face):
    status, body = post(face, "/v1/completions", {**GOOD, "model": MODEL})
    assert status == 200 and body["model"] == MODEL
    for path, req in (
        ("/v1/completions", {**GOOD, "model": "gpt-4o"}),
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}),
    ):
        status, body = post(face, path, req)
        assert_error(status, body, 404)
        assert body["error"]["param"] == "model" and body["error"]["code"] == "model_not_found"
        assert "gpt-4o" in body["error"]["message"] and MODEL in body["error"]["message"]


# ---- chat ----

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
FALLBACK = "system: be brief\nuser: hi\nassistant:"


def test_chat_with_fallback_rendering(face, tok, reference):
    ref = reference(tok.encode(FALLBACK), 20)
    req = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    status, body = post(face, "/v1/chat/completions", req)
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(tok.encode(FALLBACK))
    assert body["usage"]["completion_tokens"] == 20


def test_chat_stream(face, tok, reference):
    ref = reference(tok.encode(FALLBACK), 20)
    req = {"messages": MESSAGES, "max_completion_tokens": 20, "temperature": 0, "stream": True}
    status, headers, data = call(face, "POST", "/v1/chat/completions", req)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    evs = events(data)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in e["choices"][0]["delta"] for e in chunks[1:])
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)
    assert text == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 20


def test_chat_accepts_what_the_official_client_sends_back(face):
    """An assistant message echoed from a response (refusal, tool_calls, ... all null) and
    content as text parts are served; the off values of unsupported fields too."""
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello", "refusal": None, "tool_calls": None},
        {"role": "user", "content": "again"},
    ]
    off = {"logprobs": False, "n": 1, "response_format": {"type": "text"}, "user": "u1"}
    req = {"messages": history, "max_tokens": 3, "temperature": 0, **off}
    status, body = post(face, "/v1/chat/completions", req)
    assert status == 200, body


class TemplateTokenizer(TinyTokenizer):
    """A tokenizer with a chat template; records how it was asked to encode."""

    def __init__(self) -> None:
        super().__init__(VOCAB)
        self.add_special: list[bool] = []

    def apply_chat_template(self, messages):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special=True):
        self.add_special.append(add_special)
        return super().encode(text, add_special)


def fake_generate(seen: list, finish: str = "eos", text: str = "ok"):
    """A generate function without a model: records the request, yields one piece."""

    def generate(req: GenerationRequest) -> Iterator[Chunk]:
        seen.append(req)
        ids = [0] * len(text)
        yield Chunk(text, ids)
        yield Chunk(
            "", [], GenerationResult(ids, text, finish, GenerationStats(new_tokens=len(ids)))
        )

    return generate


def test_chat_template_is_used_without_extra_special_tokens():
    tok = TemplateTokenizer()
    seen: list = []
    with serve(fake_generate(seen), tok) as f:
        status, body = post(f, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3})
    assert status == 200, body
    assert tok.add_special == [False]
    assert list(seen[0].prompt_ids) == tok.encode("<system>be brief<user>hi<assistant>")
    assert body["choices"][0]["finish_reason"] == "stop"  # the engine's "eos"


def test_request_fields_reach_the_engine(tok):
    seen: list = []
    with serve(fake_generate(seen, finish="stop"), tok) as f:
        req = {
            "prompt": "abc",
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 7,
            "min_p": 0.1,
            "seed": 3,
            "stop": ["x", "y"],
            "max_tokens": 9,
        }
        status, body = post(f, "/v1/completions", req)
        assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
        post(f, "/v1/completions", {"prompt": "abc"})
        post(f, "/v1/completions", {"prompt": "abc", "seed": 0, "top_k": -1, "stop": "x"})
        post(f, "/v1/chat/completions", {"messages": MESSAGES})
    r, d, z, c = seen
    assert (r.params.temperature, r.params.top_p, r.params.top_k, r.params.min_p) == (
        0.5,
        0.9,
        7,
        0.1,
    )
    assert (r.seed, r.stop, r.max_new_tokens, list(r.prompt_ids)) == (3, ("x", "y"), 9, [0, 1, 2])
    assert (d.params.temperature, d.max_new_tokens, d.seed, d.stop) == (1.0, 16, None, ())
    assert (z.seed, z.params.top_k, z.stop) == (0, 0, ("x",))  # seed 0 is a seed
    assert c.max_new_tokens == 512  # chat: as many as allowed


# ---- errors ----

BAD_BODIES = [
    ({"max_tokens": 2}, "prompt"),
    ({**GOOD, "prompt": 5}, "prompt"),
    ({**GOOD, "prompt": []}, "prompt"),
    ({**GOOD, "prompt": [1, VOCAB]}, "prompt"),
    ({**GOOD, "prompt": [-1, 2]}, "prompt"),
    ({**GOOD, "prompt": [1, True]}, "prompt"),
    ({**GOOD, "prompt": ["a", "b"]}, "prompt"),
    ({**GOOD, "prompt": ""}, "prompt"),
    ({**GOOD, "prompt": "a" * 1024}, "prompt"),
    ({**GOOD, "max_tokens": 0}, "max_tokens"),
    ({**GOOD, "max_tokens": 513}, "max_tokens"),
    ({**GOOD, "max_tokens": "2"}, "max_tokens"),
    ({**GOOD, "max_tokens": 2.0}, "max_tokens"),
    ({**GOOD, "temperature": -1}, "temperature"),
    ({**GOOD, "temperature": "hot"}, "temperature"),
    ({**GOOD, "temperature": True}, "temperature"),
    ({**GOOD, "top_p": 0}, "top_p"),
    ({**GOOD, "top_k": -2}, "top_k"),
    ({**GOOD, "min_p": 1.5}, "min_p"),
    ({**GOOD, "seed": -1}, "seed"),
    ({**GOOD, "seed": 1.5}, "seed"),
    ({**GOOD, "seed": 1 << 64}, "seed"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**GOOD, "stop": 3}, "stop"),
    ({**GOOD, "stream": "yes"}, "stream"),
    ({**GOOD, "stream_options": {"include_usage": 1}}, "stream_options"),
    ({**GOOD, "n": 2}, "n"),
    ({**GOOD, "model": 4}, "model"),
    ({**GOOD, "echo": True}, "echo"),
    ({**GOOD, "logprobs": 5}, "logprobs"),
    ({**GOOD, "best_of": 2}, "best_of"),
    ({**GOOD, "suffix": "x"}, "suffix"),
    ({**GOOD, "logit_bias": {"1": 5}}, "logit_bias"),
    ({**GOOD, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({**GOOD, "presence_penalty": 1}, "presence_penalty"),
    ({**GOOD, "response_format": {"type": "json_object"}}, "response_format"),
    ({**GOOD, "tools": [{"type": "function"}]}, "tools"),
    ({**GOOD, "no_such_field": 1}, "no_such_field"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=lambda x: json.dumps(x)[:40])
def test_bad_completion_requests_are_400_naming_the_field(face, body, param):
    status, resp = post(face, "/v1/completions", body)
    assert_error(status, resp, 400)
    assert resp["error"]["param"] == param
    assert param in resp["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": 2},
        {"messages": [], "max_tokens": 2},
        {"messages": [{"content": "hi"}], "max_tokens": 2},
        {"messages": [{"role": "user", "content": 3}], "max_tokens": 2},
        {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]},
        {"messages": "hi", "max_tokens": 2},
        {"messages": MESSAGES, "max_tokens": 0},
        {"messages": MESSAGES, "max_completion_tokens": 0},
        {"messages": MESSAGES, "max_tokens": 2, "tool_choice": "auto"},
    ],
)
def test_bad_chat_requests_are_400(face, body):
    status, resp = post(face, "/v1/chat/completions", body)
    assert_error(status, resp, 400)
    assert resp["error"]["param"] is not None


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b"", b"[" * 100000])
def test_bad_json_is_400(face, raw):
    status, _, data = call(face, "POST", "/v1/completions", raw=raw)
    assert_error(status, json.loads(data), 400)


def test_routing_errors(face):
    status, _, data = call(face, "GET", "/v2/nothing")
    assert_error(status, json.loads(data), 404)
    status, headers, data = call(face, "GET", "/v1/completions")
    assert_error(status, json.loads(data), 405)
    assert headers["Allow"] == "POST"
    status, _, data = call(face, "POST", "/health", GOOD)
    assert_error(status, json.loads(data), 405)
    status, _, data = call(face, "DELETE", "/v1/models")
    assert_error(status, json.loads(data), 405)
    assert_alive(face)


def test_oversized_body_is_413_before_reading(face):
    conn = http.client.HTTPConnection("127.0.0.1", face.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Length", str(2 << 20))
        conn.endheaders()  # the body is never sent: the server must not wait for it
        resp = conn.getresponse()
        assert_error(resp.status, json.loads(resp.read()), 413)
    finally:
        conn.close()
    assert_alive(face)


def test_a_chunked_body_is_read_within_the_limit(face):
    def send(body: bytes) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", face.port, timeout=30)
        try:
            conn.request("POST", "/v1/completions", iter([body[:5], body[5:]]), encode_chunked=True)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    status, body = send(json.dumps(GOOD).encode())
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    status, body = send(json.dumps({**GOOD, "prompt": "a" * (1 << 20)}).encode())
    assert_error(status, body, 413)


def raw_post(port: int, declared: int, body: bytes, trickle: float = 0.0):
    """POST /v1/completions on a raw socket with Content-Length: declared; sends body at
    once, or a byte every trickle seconds until the server answers; reads to the close.
    Returns (status, JSON body, seconds, head)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    t0 = time.monotonic()
    got = b""
    try:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n"
        sock.sendall(head.encode())
        if not trickle:
            sock.sendall(body)
        for i in range(len(body) if trickle else 0):
            if select.select([sock], [], [], trickle)[0]:
                break  # the server answered: stop sending (more would reset the connection)
            sock.sendall(body[i : i + 1])
        while piece := sock.recv(65536):  # the server closes the connection
            got += piece
        seconds = time.monotonic() - t0
    finally:
        sock.close()
    head, _, payload = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload), seconds, head.decode().lower()


def test_a_body_that_never_arrives_whole_is_408(tok):
    seen: list = []
    with serve(fake_generate(seen), tok, body_timeout=0.5) as f:
        body = json.dumps(GOOD).encode()
        # a Content-Length larger than what is sent
        status, resp, seconds, head = raw_post(f.port, len(body) + 10, body)
        assert_error(status, resp, 408)
        assert 0.4 < seconds < 5 and "connection: close" in head
        # bytes trickled: the deadline is for the whole body, not each read
        status, resp, seconds, _ = raw_post(f.port, len(body), body, trickle=0.15)
        assert_error(status, resp, 408)
        assert 0.4 < seconds < 5
        assert call(f, "GET", "/health")[0] == 200
    assert not seen


def test_errors_on_a_kept_alive_connection_do_not_poison_it(face):
    conn = http.client.HTTPConnection("127.0.0.1", face.port, timeout=30)
    try:
        for body, want in [(b"{bad", 400), (json.dumps(GOOD).encode(), 200), (b"[]", 400)]:
            conn.request("POST", "/v1/completions", body=body)
            resp = conn.getresponse()
            assert resp.status == want
            resp.read()
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_engine_errors_from_the_generator(tok):
    """A ConfigError (bad settings) is the client's (400); Overloaded (sessions, memory) is
    503; both before any header, streamed or not; the message stays one line."""

    def generate(req):
        if req.max_new_tokens == 2:
            raise ConfigError("k is wrong\nfor this model")
        raise Overloaded("the server holds its maximum of 1 sessions")
        yield  # a generator: the error comes with the first chunk

    with serve(generate, tok) as f:
        for stream in (False, True):
            status, body = post(f, "/v1/completions", {**GOOD, "stream": stream})
            assert_error(status, body, 400)
            assert body["error"]["message"] == "k is wrong for this model"
            status, body = post(f, "/v1/completions", {**GOOD, "max_tokens": 3, "stream": stream})
            assert_error(status, body, 503, "server_error")


def test_an_error_after_the_stream_began_is_an_error_event(tok):
    def generate(req):
        yield Chunk("ab", [0, 1])
        raise ConfigError("went wrong")

    with serve(generate, tok) as f:
        evs = events(call(f, "POST", "/v1/completions", {**GOOD, "stream": True})[2])
    assert evs[0]["choices"][0]["text"] == "ab"
    assert evs[1]["error"]["message"] == "went wrong" and evs[2] == "[DONE]"


def test_unexpected_exception_is_500_and_logged(tok, caplog):
    def generate(req):
        raise RuntimeError("boom")

    caplog.set_level(logging.INFO, logger="specsplit.http")
    with serve(generate, tok) as f:
        status, body = post(f, "/v1/completions", GOOD)
        assert_error(status, body, 500, "server_error")
        assert body["error"]["message"] == "internal error"
        assert call(f, "GET", "/health")[0] == 200
    errors = [r for r in caplog.records if r.name == "specsplit.http" and r.exc_info]
    assert errors and "boom" in str(errors[0].exc_info[1])
    assert log_lines(caplog, "method=POST path=/v1/completions status=500")


def test_each_request_logs_one_line(face, caplog):
    caplog.set_level(logging.INFO, logger="specsplit.http")
    assert_alive(face)
    (line,) = log_lines(caplog, "path=/v1/completions")
    assert "method=POST" in line and "status=200" in line
    assert "prompt_tokens=3" in line and "completion_tokens=2" in line and "seconds=" in line
    assert "client_disconnected" not in line


# ---- auth ----


def test_bearer_token(target, tok):
    engine = SpeculativeEngine(target)
    with serve(engine.stream, tok, auth_token="s3cret", n_ctx=1024) as f:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, _, data = call(f, "POST", "/v1/completions", GOOD, headers)
            assert_error(status, json.loads(data), 401, "authentication_error")
        status, headers, data = call(f, "GET", "/v1/models")
        assert_error(status, json.loads(data), 401, "authentication_error")
        assert headers["WWW-Authenticate"] == "Bearer"
        assert call(f, "GET", "/health")[0] == 200
        assert call(f, "GET", "/")[0] == 200  # the page is open; it asks for the key
        status, body = post(f, "/v1/completions", GOOD, {"Authorization": "Bearer s3cret"})
        assert status == 200 and body["usage"]["completion_tokens"] == 2


# ---- disconnects ----


def test_client_disconnect_mid_stream_closes_the_generator(target, tok, caplog):
    engine = SpeculativeEngine(target)  # one token per chunk: many writes
    closed, finished = threading.Event(), threading.Event()
    caplog.set_level(logging.INFO, logger="specsplit.http")

    def generate(req):
        try:
            yield from engine.stream(req)
            finished.set()
        except GeneratorExit:
            closed.set()
            raise

    with serve(generate, tok, n_ctx=target.n_ctx, max_tokens_limit=1000) as f:
        body = json.dumps({**GOOD, "max_tokens": 900, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", f.port), timeout=30)
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        got = b""
        while b"data: " not in got:
            piece = sock.recv(4096)
            assert piece, got
            got += piece
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # reset
        assert closed.wait(5) and not finished.is_set()
        assert_alive(f)  # and the slot (concurrency 1) was given back
    assert log_lines(caplog, "client_disconnected=true")
