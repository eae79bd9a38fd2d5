"""A server going away on purpose (``SpecsplitServer.drain``, what a Ray replica does when it
is removed): its open sessions hear "session moved" after the verdicts of the rounds they
sent, resume at once elsewhere from the ids they hold with the same text; new handshakes,
sessions and Generate calls are refused with the same status; the drain waits for the
streams to end. Plus the client's mapping of the statuses a Ray deployment adds.

Servers run in this process on 127.0.0.1 over a tiny float64 Llama (as test_service_faults).
"""

from __future__ import annotations

import copy

import grpc
import pytest

from conftest import perturbed, tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.torch_backend import TorchBackend
from specsplit.engine.draft_length import FixedK
from specsplit.engine.speculative import DecodeLoop, GenerationRequest, SpeculativeEngine
from specsplit.errors import ServerFull, SessionGone, SessionMoved, VerifierUnavailable
from specsplit.proposers.draft_model import DraftModelProposer
from specsplit.sampling import SamplingParams
from specsplit.transport import wire
from specsplit.transport.client import RemoteVerifier, generate_cloud
from specsplit.transport.link import error_of
from specsplit.transport.pb import specsplit_pb2 as pb
from test_service_faults import (
    PROMPT,
    VOCAB,
    Servers,
    address,
    fingerprint,
    in_thread,
    stream_and_stop,
)


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer(VOCAB)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=VOCAB, seed=0)


@pytest.fixture
def servers(model, tok):
    s = Servers(model, tok)
    yield s
    s.stop_all()


class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_statuses_a_ray_deployment_adds():
    moved = error_of(_Err(grpc.StatusCode.UNAVAILABLE, f"{wire.MOVED} replica leaving"))
    assert isinstance(moved, SessionMoved) and isinstance(moved, SessionGone)
    plain = error_of(_Err(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert isinstance(plain, SessionGone) and not isinstance(plain, SessionMoved)
    serve_full = (
        "Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4)."
    )
    assert isinstance(error_of(_Err(grpc.StatusCode.RESOURCE_EXHAUSTED, serve_full)), ServerFull)


def test_drained_session_moves_at_once_with_the_same_text(servers, model, tok):
    a, b = servers(copy.deepcopy(model)), servers(copy.deepcopy(model))
    want = SpeculativeEngine(TorchBackend(model, tok)).generate(GenerationRequest(PROMPT, 48))
    v = RemoteVerifier([address(a), address(b)], tok, timeout=10, retry_for=10)
    drafter = DraftModelProposer(TorchBackend(perturbed(model, 0.08, 1), tok))
    loop = DecodeLoop(v, [drafter], FixedK(3))
    left: list[int] = []
    chunks, err = in_thread(
        lambda: stream_and_stop(
            loop, GenerationRequest(PROMPT, 48), lambda: left.append(a.drain("leaving", 10.0))
        )
    )
    assert err is None
    res = chunks[-1].result
    assert res.token_ids == want.token_ids  # no token lost or repeated
    assert left == [0]  # the drain waited for the session's stream to end
    assert v.moved == 1 and res.stats.reconnects == 1
    assert v.link.address == address(b) and not a.scheduler.sessions
    # a drained server refuses new work with the same status
    with pytest.raises(VerifierUnavailable, match="session moved: leaving"):
        RemoteVerifier([address(a)], tok, timeout=5, retry_for=0)
    v.shutdown()


def test_drained_server_refuses_a_session_opened_on_an_old_link(servers, model, tok):
    a = servers(copy.deepcopy(model))
    v = RemoteVerifier([address(a)], tok, timeout=5, retry_for=0.3)
    a.drain("leaving", 1.0)
    with pytest.raises(Exception, match="session moved: leaving"):
        v.open(PROMPT, SamplingParams(), 0)


def test_drained_generate_resumes_elsewhere(servers, model, tok):
    a, b = servers(copy.deepcopy(model)), servers(copy.deepcopy(model))
    sampled = SamplingParams(temperature=0.9, top_k=50)
    common = {"prompt_ids": PROMPT, "max_new_tokens": 40, "params": sampled, "seed": 3}
    whole = list(generate_cloud(address(b), fingerprint(), **common))[-1].result
    got, drained = [], []
    for chunk in generate_cloud([address(a), address(b)], fingerprint(), **common):
        got.append(chunk)
        if len(got) == 2 and not drained:
            drained.append(a.drain("leaving", 0.0))
    res = got[-1].result
    assert res.token_ids == whole.token_ids and res.stats.reconnects == 1
    assert not a.scheduler.sessions


def test_handshake_refused_while_draining_names_the_reason(servers, model, tok):
    a = servers(copy.deepcopy(model))
    a.drain("replica leaving", 0.0)
    with grpc.insecure_channel(address(a)) as ch:
        from specsplit.transport.pb import specsplit_pb2_grpc as pb_grpc

        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.VerifierStub(ch).Handshake(
                pb.Hello(protocol_version=wire.PROTOCOL_VERSION), timeout=5
            )
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e.value.details() == f"{wire.MOVED} replica leaving"
