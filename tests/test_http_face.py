"""The OpenAI-style HTTP face, end to end over real sockets on a tiny in-process model."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import TinyTokenizer, tiny_llama
from specsplit.backends.torch_backend import TorchBackend
from specsplit.engine.metrics import GenerationStats
from specsplit.engine.speculative import (
    Chunk,
    GenerationRequest,
    GenerationResult,
    SpeculativeEngine,
)
from specsplit.errors import ConfigError
from specsplit.proposers.ngram import NGramProposer
from specsplit.transport.http_face import HTTPFace

VOCAB = 300
PROMPT = "hello world hello"


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


@pytest.fixture(scope="module")
def face(target, tok):
    engine = SpeculativeEngine(target, [NGramProposer()], k=4)
    f = HTTPFace(
        engine.stream,
        tok,
        "tiny-llama",
        n_ctx=target.n_ctx,
        max_tokens_limit=512,
        metrics=lambda: "# TYPE specsplit_up gauge\nspecsplit_up 1\n",
        health=lambda: {"model": "tiny-llama"},
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


def assert_alive(face):
    status, body = post(
        face, "/v1/completions", {"prompt": "abc", "max_tokens": 2, "temperature": 0}
    )
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 2


# ---- GET endpoints ----


def test_health_models_metrics(face):
    status, _, data = call(face, "GET", "/health")
    assert status == 200 and json.loads(data) == {"status": "ok", "model": "tiny-llama"}
    status, _, data = call(face, "GET", "/v1/models")
    body = json.loads(data)
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-llama"]
    status, headers, data = call(face, "GET", "/metrics")
    assert status == 200 and data.decode().endswith("specsplit_up 1\n")
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")


def test_metrics_404_without_a_metrics_function(tok):
    with HTTPFace(lambda req: iter(()), tok, "m") as f:
        status, _, data = call(f, "GET", "/metrics")
        assert_error(status, json.loads(data), 404)


# ---- completions ----


def test_greedy_completion_equals_engine(face, tok, reference):
    ref = reference(tok.encode(PROMPT), 24)
    status, body = post(
        face, "/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    )
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "tiny-llama"
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
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
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
    assert len({e["id"] for e in evs[:-1]}) == 1


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


def test_default_temperature_samples_reproducibly_with_a_seed(face):
    req = {"prompt": PROMPT, "max_tokens": 16, "seed": 7}
    texts = {post(face, "/v1/completions", req)[1]["choices"][0]["text"] for _ in range(2)}
    assert len(texts) == 1
    assert post(face, "/v1/completions", req)[1]["specsplit"]["seed"] == 7


# ---- chat ----

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
FALLBACK = "system: be brief\nuser: hi\nassistant:"


def test_chat_with_fallback_rendering(face, tok, reference):
    ref = reference(tok.encode(FALLBACK), 20)
    req = {"model": "x", "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
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
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
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
    with HTTPFace(fake_generate(seen), tok, "m") as f:
        status, body = post(f, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3})
    assert status == 200, body
    assert tok.add_special == [False]
    assert list(seen[0].prompt_ids) == tok.encode("<system>be brief<user>hi<assistant>")
    assert body["choices"][0]["finish_reason"] == "stop"  # the engine's "eos"


def test_request_fields_reach_the_engine(tok):
    seen: list = []
    with HTTPFace(fake_generate(seen, finish="stop"), tok, "m") as f:
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
    r, d = seen
    assert (r.params.temperature, r.params.top_p, r.params.top_k, r.params.min_p) == (
        0.5,
        0.9,
        7,
        0.1,
    )
    assert (r.seed, r.stop, r.max_new_tokens, list(r.prompt_ids)) == (3, ("x", "y"), 9, [0, 1, 2])
    assert (d.params.temperature, d.max_new_tokens, d.seed, d.stop) == (1.0, 16, None, ())


# ---- errors ----

GOOD = {"prompt": "abc", "max_tokens": 2, "temperature": 0}
BAD_BODIES = [
    ({"max_tokens": 2}, "prompt"),
    ({**GOOD, "prompt": 5}, "prompt"),
    ({**GOOD, "prompt": []}, "prompt"),
    ({**GOOD, "prompt": [1, VOCAB]}, "prompt"),
    ({**GOOD, "prompt": [-1, 2]}, "prompt"),
    ({**GOOD, "prompt": [1, True]}, "prompt"),
    ({**GOOD, "prompt": ""}, "prompt"),
    ({**GOOD, "prompt": "a" * 1024}, "prompt"),
    ({**GOOD, "max_tokens": 0}, "max_tokens"),
    ({**GOOD, "max_tokens": 513}, "max_tokens"),
    ({**GOOD, "max_tokens": "2"}, "max_tokens"),
    ({**GOOD, "temperature": -1}, None),
    ({**GOOD, "temperature": "hot"}, "temperature"),
    ({**GOOD, "top_p": 0}, None),
    ({**GOOD, "top_k": -2}, None),
    ({**GOOD, "min_p": 1.5}, None),
    ({**GOOD, "seed": -1}, "seed"),
    ({**GOOD, "seed": 1.5}, "seed"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**GOOD, "stop": 3}, "stop"),
    ({**GOOD, "stream": "yes"}, "stream"),
    ({**GOOD, "n": 2}, "n"),
    ({**GOOD, "echo": True}, "echo"),
    ({**GOOD, "logprobs": 5}, "logprobs"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=lambda x: json.dumps(x)[:40])
def test_bad_completion_requests_are_400(face, body, param):
    status, resp = post(face, "/v1/completions", body)
    assert_error(status, resp, 400)
    assert resp["error"]["param"] == param


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": 2},
        {"messages": [], "max_tokens": 2},
        {"messages": [{"content": "hi"}], "max_tokens": 2},
        {"messages": [{"role": "user", "content": 3}], "max_tokens": 2},
        {"messages": "hi", "max_tokens": 2},
        {"messages": MESSAGES, "max_tokens": 0},
    ],
)
def test_bad_chat_requests_are_400(face, body):
    status, resp = post(face, "/v1/chat/completions", body)
    assert_error(status, resp, 400)


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


def test_config_error_from_the_generator_is_400(tok):
    def generate(req):
        raise ConfigError("k is wrong\nfor this model")
        yield  # a generator: the error comes with the first chunk

    with HTTPFace(generate, tok, "m") as f:
        for stream in (False, True):
            status, body = post(f, "/v1/completions", {**GOOD, "stream": stream})
            assert_error(status, body, 400)
            assert body["error"]["message"] == "k is wrong for this model"


def test_unexpected_exception_is_500_and_logged(tok, caplog):
    def generate(req):
        raise RuntimeError("boom")

    caplog.set_level(logging.INFO, logger="specsplit.http")
    with HTTPFace(generate, tok, "m") as f:
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


# ---- auth ----


def test_bearer_token(target, tok):
    engine = SpeculativeEngine(target)
    with HTTPFace(engine.stream, tok, "m", auth_token="s3cret", n_ctx=1024) as f:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, body = post(f, "/v1/completions", GOOD, headers)
            assert_error(status, body, 401, "authentication_error")
        status, _, data = call(f, "GET", "/v1/models")
        assert_error(status, json.loads(data), 401, "authentication_error")
        assert call(f, "GET", "/health")[0] == 200
        status, body = post(f, "/v1/completions", GOOD, {"Authorization": "Bearer s3cret"})
        assert status == 200 and body["usage"]["completion_tokens"] == 2


# ---- disconnects ----


def test_client_disconnect_mid_stream_closes_the_generator(target, tok):
    engine = SpeculativeEngine(target)  # one token per chunk: many writes
    closed, finished = threading.Event(), threading.Event()

    def generate(req):
        try:
            yield from engine.stream(req)
            finished.set()
        except GeneratorExit:
            closed.set()
            raise

    with HTTPFace(generate, tok, "m", n_ctx=target.n_ctx) as f:
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
        sock.close()  # reset: the server's next write fails
        assert closed.wait(15) and not finished.is_set()
        assert_alive(f)
