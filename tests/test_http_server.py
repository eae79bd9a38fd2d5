"""The HTTP face on a ``SpecsplitServer`` (tiny in-process model): requests go through the
batch scheduler at once, a client that leaves frees its session at once, and the server's
counters are served as Prometheus metrics and as JSON."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time

import pytest

from conftest import TinyTokenizer, tiny_llama
from specsplit.backends.torch_backend import TorchBackend
from specsplit.engine.speculative import GenerationRequest, SpeculativeEngine
from specsplit.proposers.ngram import NGramProposer
from specsplit.transport.server import ServerConfig, SpecsplitServer

VOCAB = 300
PROMPT = "hello world hello"

METRICS = [
    "specsplit_sessions",
    "specsplit_queue_rounds",
    "specsplit_kv_bytes",
    "specsplit_kv_budget_bytes",
    "specsplit_passes_total",
    "specsplit_rounds_total",
    "specsplit_batch_size_passes_total",
    "specsplit_batch_size_mean",
    "specsplit_dropped_rounds_total",
    "specsplit_draft_tokens_total",
    "specsplit_accepted_tokens_total",
    "specsplit_acceptance_rate",
    "specsplit_emitted_tokens_total",
    "specsplit_prefill_tokens_total",
    "specsplit_evictions_total",
    "specsplit_verify_seconds_total",
    "specsplit_received_bytes_total",
    "specsplit_sent_bytes_total",
    "specsplit_refused_total",
]


@pytest.fixture(scope="module")
def tok() -> TinyTokenizer:
    return TinyTokenizer(VOCAB)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=VOCAB, seed=0)


@pytest.fixture(scope="module")
def server(model, tok):
    config = ServerConfig(port=0, http_port=0, rate=None, batch_window=0.02, calibrate=False)
    srv = SpecsplitServer(TorchBackend(model, tok), "tiny", config, lambda: [NGramProposer()])
    srv.start()
    yield srv
    srv.stop(grace=0)


def request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=60)
    try:
        conn.request(method, path, None if body is None else json.dumps(body), headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def wait_for(cond, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_concurrent_requests_go_through_the_batch_scheduler(server, model, tok):
    """Three streams at once: each equals the target's greedy text, and the scheduler
    verified rounds of several of them in one pass."""
    ref = SpeculativeEngine(TorchBackend(model, tok)).generate(
        GenerationRequest(tok.encode(PROMPT), 48)
    )
    before = dict(server.scheduler.stats.batch_sizes)
    texts: list[str] = []

    def one() -> None:
        req = {"prompt": PROMPT, "max_tokens": 48, "temperature": 0, "stream": True}
        data = request(server, "POST", "/v1/completions", req)[2].decode()
        evs = [json.loads(b[6:]) for b in data.split("\n\n") if b.startswith("data: {")]
        texts.append("".join(e["choices"][0]["text"] for e in evs))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert texts == [ref.text] * 3
    after = server.scheduler.stats.batch_sizes
    assert any(after.get(n, 0) > before.get(n, 0) for n in after if n >= 2), after
    assert wait_for(lambda: not server.scheduler.sessions, 2)


def _start_and_leave(server, body: dict, wait_for_event: bool) -> None:
    """Send a request on a raw socket, wait until it is generating, then reset it."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.http.port), timeout=30)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    if wait_for_event:
        got = b""
        while b"data: " not in got:
            piece = sock.recv(4096)
            assert piece, got
            got += piece
    assert wait_for(lambda: len(server.scheduler.sessions) == 1, 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # reset


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_session_at_once(server, stream):
    emitted = server.scheduler.stats.emitted
    body = {"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": stream}
    _start_and_leave(server, body, wait_for_event=stream)
    t0 = time.monotonic()
    assert wait_for(lambda: not server.scheduler.sessions, 2), server.scheduler.sessions
    assert time.monotonic() - t0 < 2
    time.sleep(0.2)
    done = server.scheduler.stats.passes
    time.sleep(0.3)
    assert server.scheduler.stats.passes == done  # no more rounds
    assert server.scheduler.stats.emitted - emitted < 900  # stopped, not finished
    status, _, _ = request(server, "GET", "/health")
    assert status == 200


def test_metrics_keep_their_names(server):
    request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    status, headers, data = request(server, "GET", "/metrics")
    text = data.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in METRICS:
        if name != "specsplit_refused_total":  # (no sample until an RPC is refused)
            assert f"\n{name}" in text, name
    assert "# TYPE specsplit_refused_total counter" in text
    assert 'specsplit_batch_size_passes_total{size="1"}' in text
    assert "specsplit_passes_total" in server.metrics_text()
    status, headers, data = request(
        server, "GET", "/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert data.decode().rstrip().endswith("# EOF")


def test_servers_in_one_process_keep_their_own_metrics(server, model, tok):
    other = SpecsplitServer(TorchBackend(model, tok), "other", ServerConfig(calibrate=False))
    request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
    assert "specsplit_passes_total 0.0" in other.metrics_text()
    assert "specsplit_passes_total 0.0" not in server.metrics_text()


def test_status_for_the_page(server):
    request(server, "POST", "/v1/completions", {"prompt": "abcabcabcabc", "max_tokens": 8})
    status, _, data = request(server, "GET", "/status")
    s = json.loads(data)
    assert status == 200 and s["target"] == "tiny"
    assert s["sessions"] == 0 and s["queue_rounds"] == 0 and s["max_batch"] == 8
    assert s["passes"] > 0 and sum(s["batch_sizes"].values()) == s["passes"]
    (drafter,) = s["drafters"]
    assert drafter["drafter"] == "ngram" and drafter["requests"] >= 1
    for key in ("kv_bytes", "acceptance_rate", "evictions", "dropped_rounds", "refused"):
        assert key in s
    status, _, data = request(server, "GET", "/")
    assert status == 200 and b"<html" in data


def test_unknown_model_is_refused_and_models_lists_the_target(server):
    status, _, data = request(server, "GET", "/v1/models")
    assert [m["id"] for m in json.loads(data)["data"]] == ["tiny"]
    status, _, data = request(
        server, "POST", "/v1/completions", {"model": "gpt-4o", "prompt": PROMPT, "max_tokens": 2}
    )
    assert status == 404 and json.loads(data)["error"]["code"] == "model_not_found"
