"""Failover and overload across several servers: cloud-only generation that resumes on the
next server with the same text, full servers that send clients on, one "server full" status
that comes before gRPC's own limits, errors that name every server tried, and a resumed
session that keeps to the new server's limits.

All servers run in this process on 127.0.0.1 (any free port) over a tiny float64 Llama.
"""

from __future__ import annotations

import copy
import queue
import socket

import grpc
import pytest

from conftest import perturbed, tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.torch_backend import TorchBackend
from specsplit.engine.draft_length import FixedK
from specsplit.engine.speculative import DecodeLoop, GenerationRequest, SpeculativeEngine
from specsplit.errors import Interrupted, VerifierUnavailable
from specsplit.proposers.draft_model import DraftModelProposer
from specsplit.sampling import SamplingParams
from specsplit.transport import wire
from specsplit.transport.client import RemoteVerifier, generate_cloud
from specsplit.transport.pb import specsplit_pb2 as pb
from test_service_faults import (
    CALL_TIMEOUT,
    PROMPT,
    VOCAB,
    Raw,
    Servers,
    address,
    assert_refused,
    fingerprint,
    hello,
    in_thread,
    open_msg,
    stream_and_stop,
    wait_for,
)

SAMPLED = SamplingParams(temperature=0.9, top_k=50)


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer(VOCAB)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=VOCAB, seed=0)


@pytest.fixture(scope="module")
def draft_model(model):
    return perturbed(model, 0.08, 1)


@pytest.fixture
def fresh_servers(model, tok):
    """Servers for one test (stopped by the test or at its end)."""
    s = Servers(model, tok)
    yield s
    s.stop_all()


def greedy(model, tok, n: int) -> list[int]:  # noqa: ANN001
    """The target's own greedy ids for PROMPT."""
    return (
        SpeculativeEngine(TorchBackend(model, tok)).generate(GenerationRequest(PROMPT, n)).token_ids
    )


def dead_address() -> str:
    """An address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def cloud_until(chunks, n: int, stop) -> tuple[list, Exception | None]:  # noqa: ANN001
    """Iterate cloud chunks; call stop() after the n-th. The chunks and the error, if any."""
    got: list = []
    try:
        for chunk in chunks:
            got.append(chunk)
            if len(got) == n:
                stop()
    except Exception as e:  # noqa: BLE001 - returned to the test
        return got, e
    return got, None


# ---- cloud-only across servers ----


def test_cloud_only_resumes_on_the_next_server_with_the_same_text(fresh_servers, model, tok):
    """The first server dies mid-stream: the second goes on from the ids received (the prompt
    as text, rendered by the first), no token lost or repeated, the same sampled text as an
    uninterrupted run with the seed, which itself replays."""
    a, b = fresh_servers(copy.deepcopy(model)), fresh_servers(copy.deepcopy(model))
    prompt = "Hello world! He"
    ids = a.service.generation_request(pb.GenerateRequest(prompt=prompt)).prompt_ids
    want = SpeculativeEngine(TorchBackend(model, tok)).generate(
        GenerationRequest(ids, 48, SAMPLED, seed=5)
    )
    common = {"prompt": prompt, "max_new_tokens": 48, "params": SAMPLED, "seed": 5}
    for _ in range(2):  # the seeded request replays, and equals the local engine's text
        res = list(generate_cloud(address(b), fingerprint(), **common))[-1].result
        assert (res.token_ids, res.text) == (want.token_ids, want.text)
        assert res.stats.reconnects == 0
    chunks, err = in_thread(
        lambda: cloud_until(
            generate_cloud([address(a), address(b)], fingerprint(), **common),
            3,
            lambda: a.stop(grace=0),
        )
    )
    assert err is None, repr(err)
    res = chunks[-1].result
    assert res is not None and all(c.result is None for c in chunks[:-1])
    assert res.token_ids == want.token_ids and res.text == want.text
    assert [t for c in chunks for t in c.token_ids] == res.token_ids
    assert "".join(c.text for c in chunks) == res.text
    assert res.finish_reason == "length" and res.stats.new_tokens == 48
    assert res.stats.reconnects == 1 and res.stats.seed == 5
    assert res.stats.bytes_sent > 0 and res.stats.bytes_received > 0
    wait_for(lambda: not b.scheduler.sessions, what="the resumed generation to end")


def test_every_server_is_named_when_all_are_gone(fresh_servers, model, draft_model, tok):
    """No server left: the error names each server tried and why, for the edge and for
    cloud-only, and keeps the output generated so far."""
    dead = dead_address()
    a = fresh_servers(copy.deepcopy(model))
    v = RemoteVerifier([address(a), dead], tok, timeout=5, retry_for=1)
    loop = DecodeLoop(v, [DraftModelProposer(TorchBackend(draft_model, tok))], FixedK(3))
    try:
        chunks, err = in_thread(
            lambda: stream_and_stop(loop, GenerationRequest(PROMPT, 64), lambda: a.stop(0))
        )
    finally:
        v.shutdown()
    assert isinstance(err, Interrupted), repr(err)
    b = fresh_servers(copy.deepcopy(model))
    got, cloud_err = in_thread(
        lambda: cloud_until(
            generate_cloud(
                [address(b), dead], fingerprint(), prompt_ids=PROMPT, retry_for=1, seed=1
            ),
            3,
            lambda: b.stop(0),
        )
    )
    assert isinstance(cloud_err, Interrupted), repr(cloud_err)
    assert cloud_err.token_ids == [t for c in got for t in c.token_ids]
    for e, srv in ((err, a), (cloud_err, b)):
        why = str(e)
        assert "\n" not in why
        assert f"{address(srv)}: UNAVAILABLE" in why and f"{dead}: UNAVAILABLE" in why, why
    with pytest.raises(VerifierUnavailable) as info:  # none answers at all
        list(generate_cloud([dead, address(a)], fingerprint(), prompt_ids=PROMPT, retry_for=0))
    assert dead in str(info.value) and address(a) in str(info.value)


# ---- full servers ----


def test_a_full_server_sends_clients_to_the_next(fresh_servers, model, tok):
    """The first server holds its maximum of sessions: edge and cloud-only clients go on to
    the second instead of failing."""
    full = fresh_servers(copy.deepcopy(model), max_sessions=1)
    idle = fresh_servers(copy.deepcopy(model))
    want = greedy(model, tok, 16)
    with Raw(full) as raw, raw.stream(open_msg()) as held:
        assert held.recv().WhichOneof("msg") == "opened"
        why = assert_refused(raw.session([open_msg()]), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert why.startswith(wire.FULL)
        v = RemoteVerifier([address(full), address(idle)], tok, timeout=5, retry_for=5)
        try:
            res = in_thread(lambda: DecodeLoop(v, []).generate(GenerationRequest(PROMPT, 16)))
        finally:
            v.shutdown()
        assert res.token_ids == want and v.link.address == address(idle)
        chunks = in_thread(
            lambda: list(generate_cloud([address(full), address(idle)], fingerprint(),
                                        prompt_ids=PROMPT, max_new_tokens=16))
        )  # fmt: skip
        assert chunks[-1].result.token_ids == want
        assert chunks[-1].result.stats.reconnects == 1
    wait_for(lambda: not idle.scheduler.sessions, what="the sessions to end")


def test_full_is_one_status_that_comes_before_grpcs_own_limit(fresh_servers, model, tok):
    """Past its streams (2 x max_sessions; idle ones and joined drafters count) the server
    refuses with RESOURCE_EXHAUSTED "server full: ...", never with gRPC's "Concurrent RPC limit
    exceeded!", and still answers handshakes; a client then goes on to its next server."""
    srv = fresh_servers(copy.deepcopy(model), max_sessions=2)
    other = fresh_servers(copy.deepcopy(model))
    limit, extra = 4, 12
    with Raw(srv) as raw:
        queues = [queue.Queue() for _ in range(limit + extra)]
        # streams that never send a message: each holds a slot (and a server thread)
        calls = [raw.stub.Session(iter(q.get, None), timeout=CALL_TIMEOUT) for q in queues]
        try:
            wait_for(
                lambda: sum(c.done() for c in calls) >= extra,
                timeout=10,
                what="the streams past the limit to be refused",
            )
            refused = [c for c in calls if c.done()]
            assert len(refused) == extra
            for call in refused:
                why = assert_refused(
                    (call.code(), call.details()), grpc.StatusCode.RESOURCE_EXHAUSTED
                )
                assert why.startswith(wire.FULL), why
            for _ in range(3):
                _, code, why = raw.handshake(hello())
                assert code == grpc.StatusCode.OK, why
            why = assert_refused(
                raw.generate(pb.GenerateRequest(prompt_ids=PROMPT, max_new_tokens=2)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            assert why.startswith(wire.FULL)
            v = RemoteVerifier([address(srv), address(other)], tok, timeout=5, retry_for=5)
            try:
                v.open(PROMPT, SamplingParams(), 1)
                assert v.link.address == address(other)
            finally:
                v.shutdown()
        finally:
            for q, call in zip(queues, calls, strict=True):
                q.put(None)
                call.cancel()
    wait_for(lambda: srv.service.streams.n == 0, what="every stream slot to be free")


# ---- a resumed session keeps to the new server's limits ----


def test_resume_on_a_server_with_a_smaller_max_draft(fresh_servers, model, draft_model, tok):
    a = fresh_servers(copy.deepcopy(model), max_draft=16)
    b = fresh_servers(copy.deepcopy(model), max_draft=4)
    want = greedy(model, tok, 64)
    v = RemoteVerifier([address(a), address(b)], tok, timeout=10, retry_for=10)
    loop = DecodeLoop(v, [DraftModelProposer(TorchBackend(draft_model, tok))], FixedK(8))
    try:
        chunks, err = in_thread(
            lambda: stream_and_stop(loop, GenerationRequest(PROMPT, 64), lambda: a.stop(0))
        )
    finally:
        v.shutdown()
    assert err is None, repr(err)
    res = chunks[-1].result
    assert res.token_ids == want and res.stats.reconnects >= 1
    assert v.max_draft == 4 and max(res.stats.draft_lengths[-3:]) <= 4
