"""API keys: a name, a rate and a token quota per key, on gRPC and HTTP alike; usage per key
in the metrics; clients behind one address limited by their keys, not together."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest

from conftest import tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.torch_backend import TorchBackend
from specsplit.engine.speculative import DecodeLoop, GenerationRequest
from specsplit.errors import ConfigError, Overloaded
from specsplit.proposers.ngram import NGramProposer
from specsplit.transport.client import RemoteVerifier
from specsplit.transport.keys import Keys, Principal, QuotaExceeded, RateLimited
from specsplit.transport.pb import specsplit_pb2 as pb
from specsplit.transport.pb import specsplit_pb2_grpc as pb_grpc
from specsplit.transport.server import ServerConfig, SpecsplitServer
from specsplit.transport.wire import PROTOCOL_VERSION

PROMPT = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]
ALICE, BOB, CAROL = "sk-alice-0001", "sk-bob-000002", "sk-carol-0003"


def write_keys(path, entries) -> str:  # noqa: ANN001
    path.write_text(json.dumps({"keys": entries}))
    return str(path)


@pytest.mark.parametrize(
    "entries, needle",
    [
        ([{"key": "short", "name": "a"}], r"8\+ characters"),
        ([{"key": ALICE, "name": "a"}, {"key": ALICE, "name": "b"}], "unique"),
        ([{"key": ALICE}], "'name'"),
        ([{"key": ALICE, "name": "a", "quota": 5}], "unknown field 'quota'"),
        ([{"key": ALICE, "name": "a", "rate": 0}], "rate must be > 0"),
        ([], "non-empty"),
    ],
)
def test_a_bad_keys_file_is_one_clear_line(entries, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle):
        Keys.load(write_keys(tmp_path / "keys.json", entries), 100.0)


def test_principal_rate_and_quota():
    p = Principal("a", rate=1.0, burst=3)
    for _ in range(3):
        p.admit()
    with pytest.raises(RateLimited, match="key a may send 1 calls per second"):
        p.admit()
    q = Principal("q", token_quota=10)
    q.admit()
    q.used(10)
    with pytest.raises(QuotaExceeded, match="key q used 10 of its 10 tokens"):
        q.admit()
    assert (q.calls, q.tokens, dict(q.refused)) == (1, 10, {"quota": 1})


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer(300)


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):
    path = write_keys(
        tmp_path_factory.mktemp("keys") / "keys.json",
        [
            {"key": ALICE, "name": "alice", "token_quota": 30},
            {"key": BOB, "name": "bob"},
            {"key": CAROL, "name": "carol", "rate": 2},
        ],
    )
    srv = SpecsplitServer(
        TorchBackend(tiny_llama(vocab=300, seed=0), tok),
        "tiny",
        ServerConfig(port=0, http_port=0, keys=Keys.load(path, 200.0), calibrate=False),
        make_proposers=lambda: [NGramProposer()],
    )
    srv.start()
    yield srv
    srv.stop(grace=0)


def _generate(server, tok, key: str, n: int) -> list[int]:  # noqa: ANN001
    v = RemoteVerifier([f"127.0.0.1:{server.port}"], tok, auth_token=key, retry_for=1)
    try:
        # no drafter: one token a round, so the server counts exactly the tokens kept
        return DecodeLoop(v).generate(GenerationRequest(PROMPT, n)).token_ids
    finally:
        v.shutdown()


def _http(server, key: str | None, max_tokens: int = 8) -> tuple[int, dict]:  # noqa: ANN001
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http.port}/v1/completions",
        body,
        {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metrics(server) -> str:  # noqa: ANN001
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http.port}/metrics", headers={"Authorization": f"Bearer {BOB}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def test_unknown_keys_are_refused_on_both_faces(server, tok):
    with pytest.raises(ConfigError, match="UNAUTHENTICATED"):
        _generate(server, tok, "sk-nobody-000", 4)
    status, body = _http(server, "sk-nobody-000")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert _http(server, None)[0] == 401


def test_a_quota_spans_grpc_and_http_and_other_keys_go_on(server, tok):
    assert len(_generate(server, tok, ALICE, 20)) == 20  # 20 of alice's 30 tokens
    status, body = _http(server, ALICE, max_tokens=12)  # 32 of 30: this one still ran
    assert status == 200 and body["usage"]["completion_tokens"] == 12
    status, body = _http(server, ALICE)  # and now she is out, on HTTP ...
    assert status == 429 and body["error"]["code"] == "insufficient_quota"
    assert "key alice used 32 of its 30 tokens" in body["error"]["message"]
    with pytest.raises(Overloaded, match="quota exceeded: key alice"):  # ... and on gRPC
        _generate(server, tok, ALICE, 4)
    # bob calls from the same address: his own limits, not alice's
    assert len(_generate(server, tok, BOB, 8)) == 8
    assert _http(server, BOB)[0] == 200
    text = _metrics(server)
    assert 'specsplit_key_tokens_total{key="alice"} 32.0' in text
    assert 'specsplit_key_token_quota{key="alice"} 30.0' in text
    assert 'specsplit_key_refused_total{key="alice",reason="quota"} 2.0' in text
    assert 'specsplit_key_tokens_total{key="bob"} 16.0' in text


def test_a_rate_per_key(server):
    stub = pb_grpc.VerifierStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    meta = [("authorization", f"Bearer {CAROL}")]
    hello = pb.Hello(protocol_version=PROTOCOL_VERSION, tokenizer_fingerprint="")
    stub.Handshake(hello, metadata=meta, timeout=5)  # (a handshake is not a call)
    codes = []
    for _ in range(40):  # carol's burst, then her rate of 2 per second
        status, _ = _http(server, CAROL, max_tokens=1)
        codes.append(status)
        if status == 429:
            break
    assert codes[-1] == 429 and codes.count(200) >= 30
    assert _http(server, BOB, max_tokens=1)[0] == 200
