"""Faults at the gRPC verification service: bad credentials, bad handshakes, malformed and
hostile session messages, limits, clients that vanish, servers that stop mid-generation, and
a protocol fuzz. Every refusal must carry the right status code and a one-line reason, and
after it the same server must still serve a good greedy session with the exact reference text.

All servers run in this process on 127.0.0.1 (any free port) over a tiny float64 Llama.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import TinyTokenizer, perturbed, tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.torch_backend import TorchBackend
from specsplit.engine.draft_length import FixedK
from specsplit.engine.speculative import (
    DecodeLoop,
    GenerationRequest,
    GenerationResult,
    SpeculativeEngine,
)
from specsplit.errors import ConfigError, Interrupted, SessionGone
from specsplit.proposers.draft_model import DraftModelProposer
from specsplit.sampling import GREEDY, SamplingParams
from specsplit.transport import wire
from specsplit.transport.client import RemoteVerifier
from specsplit.transport.pb import specsplit_pb2 as pb
from specsplit.transport.pb import specsplit_pb2_grpc as pb_grpc
from specsplit.transport.server import ServerConfig, SpecsplitServer

VOCAB = 300
PROMPT = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 72, 101]
GOOD_TOKENS = 24  # new tokens of the good session run after every refusal
Q_TOTAL = wire.Q_TOTAL
CALL_TIMEOUT = 20.0  # seconds: the deadline of every raw RPC
RUN_TIMEOUT = 60.0  # seconds: the most a whole generation may take
UNEXPECTED = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a hang
}


# ---- fixtures ----


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer(VOCAB)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=VOCAB, seed=0)


@pytest.fixture(scope="module")
def draft_model(model):
    return perturbed(model, 0.08, 1)


@pytest.fixture(scope="module")
def reference(model, tok) -> Callable[[int], GenerationResult]:
    """The local engine's greedy result for PROMPT and n new tokens (cached)."""
    engine = SpeculativeEngine(TorchBackend(model, tok))
    cache: dict[int, GenerationResult] = {}

    def ref(n: int) -> GenerationResult:
        if n not in cache:
            cache[n] = engine.generate(GenerationRequest(PROMPT, n))
        return cache[n]

    return ref


class Servers:
    """Starts servers on any free port; stops every one it started at teardown."""

    def __init__(self, model, tok) -> None:
        self.model, self.tok = model, tok
        self.started: list[SpecsplitServer] = []

    def __call__(self, model=None, **config: Any) -> SpecsplitServer:
        config = {"port": 0, "calibrate": False, "rate": None, **config}
        srv = SpecsplitServer(
            TorchBackend(model or self.model, self.tok), "tiny", ServerConfig(**config)
        )
        srv.start()
        self.started.append(srv)
        return srv

    def stop_all(self) -> None:
        for srv in self.started:
            if not srv.stopped.is_set():
                srv.stop(grace=0)


@pytest.fixture(scope="module")
def servers(model, tok):
    s = Servers(model, tok)
    yield s
    s.stop_all()


@pytest.fixture
def fresh_servers(model, tok):
    """Servers for one test (stopped by the test or at its end)."""
    s = Servers(model, tok)
    yield s
    s.stop_all()


@pytest.fixture(scope="module")
def main(servers) -> SpecsplitServer:
    """The server most refusals go to (max_draft=4 for the draft-size limit)."""
    return servers(max_draft=4)


@pytest.fixture(scope="module")
def good(tok, draft_model, reference):
    """Runs a good greedy session on a server and checks it against the reference."""

    def run(
        srv: SpecsplitServer,
        *,
        n: int = GOOD_TOKENS,
        drafter: bool = True,
        auth_token: str | None = None,
    ) -> GenerationResult:
        def generate() -> GenerationResult:
            v = RemoteVerifier([address(srv)], tok, auth_token=auth_token, timeout=10, retry_for=5)
            try:
                proposers = [DraftModelProposer(TorchBackend(draft_model, tok))] if drafter else []
                loop = DecodeLoop(v, proposers, FixedK(3 if drafter else 0))
                return loop.generate(GenerationRequest(PROMPT, n))
            finally:
                v.shutdown()

        res = in_thread(generate)
        want = reference(n)
        assert res.token_ids == want.token_ids
        assert res.text == want.text
        assert res.stats.reconnects == 0
        wait_for(
            lambda: not srv.scheduler.sessions and not srv.service.hubs,
            what="every session to end",
        )
        return res

    return run


# ---- helpers ----


def address(srv: SpecsplitServer) -> str:
    return f"127.0.0.1:{srv.port}"


def in_thread(fn: Callable[[], Any], timeout: float = RUN_TIMEOUT) -> Any:
    """fn() in a daemon thread, waited for at most timeout seconds (a hang fails the test)."""
    fut: Future = Future()

    def target() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            fut.set_exception(e)

    threading.Thread(target=target, daemon=True).start()
    return fut.result(timeout=timeout)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Raw:
    """A raw stub on its own channel (no client-side message size limit)."""

    def __init__(self, srv: SpecsplitServer, token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(address(srv))
        self.stub = pb_grpc.VerifierStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def handshake(self, hello: pb.Hello) -> tuple[pb.Welcome | None, grpc.StatusCode, str]:
        try:
            w = self.stub.Handshake(hello, metadata=self.metadata, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            return None, e.code(), e.details() or ""
        return w, grpc.StatusCode.OK, ""

    def session(
        self, msgs: Iterable[pb.ClientMsg]
    ) -> tuple[list[pb.ServerMsg], grpc.StatusCode, str]:
        """Send msgs (then half-close); all answers and how the call ended."""
        out: list[pb.ServerMsg] = []
        call = self.stub.Session(iter(list(msgs)), metadata=self.metadata, timeout=CALL_TIMEOUT)
        try:
            for m in call:
                out.append(m)
        except grpc.RpcError as e:
            return out, e.code(), e.details() or ""
        return out, grpc.StatusCode.OK, ""

    def generate(
        self, req: pb.GenerateRequest
    ) -> tuple[list[pb.GenerateChunk], grpc.StatusCode, str]:
        out: list[pb.GenerateChunk] = []
        try:
            for c in self.stub.Generate(req, metadata=self.metadata, timeout=CALL_TIMEOUT):
                out.append(c)
        except grpc.RpcError as e:
            return out, e.code(), e.details() or ""
        return out, grpc.StatusCode.OK, ""

    def stream(self, first: pb.ClientMsg) -> Stream:
        return Stream(self, first)


class Stream:
    """An open Session call: send messages one by one, read answers one by one."""

    def __init__(self, raw: Raw, first: pb.ClientMsg) -> None:
        self.q: queue.Queue = queue.Queue()
        self.q.put(first)
        self.call = raw.stub.Session(
            iter(self.q.get, None), metadata=raw.metadata, timeout=CALL_TIMEOUT
        )

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.q.put(None)  # ends the request iterator (its thread must not block forever)
        self.call.cancel()

    def send(self, msg: pb.ClientMsg) -> None:
        self.q.put(msg)

    def recv(self) -> pb.ServerMsg:
        return next(self.call)  # bounded by the call's deadline

    def half_close(self) -> None:
        self.q.put(None)


def fingerprint() -> str:
    return ByteTokenizer(VOCAB).fingerprint()


def open_msg(
    prompt: Iterable[int] = PROMPT,
    sampling: pb.Sampling | None = None,
    fp: str | None = None,
    seed: int = 1,
) -> pb.ClientMsg:
    return pb.ClientMsg(
        open=pb.Open(
            prompt_ids=list(prompt),
            sampling=sampling or pb.Sampling(),
            seed=seed,
            tokenizer_fingerprint=fingerprint() if fp is None else fp,
        )
    )


def draft_msg(
    tokens: Iterable[int] = (), version: int = 0, q=None, pipelined: bool = False
) -> pb.ClientMsg:
    toks = list(tokens)
    chains = [pb.Chain(tokens=toks, q=q or [])] if toks else []
    return pb.ClientMsg(draft=pb.Draft(version=version, chains=chains, pipelined=pipelined))


def close_msg() -> pb.ClientMsg:
    return pb.ClientMsg(close=pb.Close())


def hello(**kw: Any) -> pb.Hello:
    fields = {"protocol_version": wire.PROTOCOL_VERSION, "tokenizer_fingerprint": fingerprint()}
    return pb.Hello(**{**fields, **kw})


def assert_refused(got: tuple, code: grpc.StatusCode) -> str:
    """The call ended with code and a non-empty one-line reason; returns the reason."""
    *_, got_code, details = got
    assert got_code == code, f"{got_code} ({details!r}), expected {code}"
    assert details.strip() and "\n" not in details, repr(details)
    return details


# ---- 1. authentication ----


def test_auth_token_is_required(servers, tok, good):
    srv = servers(auth_token="s3cret")
    with Raw(srv) as raw:
        assert_refused(raw.handshake(hello()), grpc.StatusCode.UNAUTHENTICATED)
        assert_refused(raw.session([open_msg()]), grpc.StatusCode.UNAUTHENTICATED)
        assert_refused(
            raw.generate(pb.GenerateRequest(prompt_ids=PROMPT, max_new_tokens=2)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    with Raw(srv, token="wrong") as raw:
        assert_refused(raw.handshake(hello()), grpc.StatusCode.UNAUTHENTICATED)
        assert_refused(raw.session([open_msg()]), grpc.StatusCode.UNAUTHENTICATED)
    with Raw(srv, token="s3cret") as raw:
        w, code, _ = raw.handshake(hello())
        assert code == grpc.StatusCode.OK and w.vocab_size == VOCAB
    for token in (None, "s3cret2", "s3cre"):
        with pytest.raises(ConfigError, match="UNAUTHENTICATED") as info:
            RemoteVerifier([address(srv)], tok, auth_token=token, timeout=5, retry_for=1)
        assert "\n" not in str(info.value)
    assert not srv.scheduler.sessions
    good(srv, auth_token="s3cret")


# ---- 2. handshake ----


def test_handshake_refusals(main, tok, good):
    with Raw(main) as raw:
        for version in (0, 1, 3, 2**32 - 1):
            why = assert_refused(
                raw.handshake(hello(protocol_version=version)),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert f"protocol version {version};" in why
            assert f"speaks {wire.PROTOCOL_VERSION}" in why
        for other in (ByteTokenizer(301), TinyTokenizer(VOCAB)):
            fp = other.fingerprint()
            why = assert_refused(
                raw.handshake(hello(tokenizer_fingerprint=fp)),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert "tokenizer" in why
            assert_refused(raw.session([open_msg(fp=fp)]), grpc.StatusCode.FAILED_PRECONDITION)
        # a handshake without a vocabulary takes the server's; a session must name it
        welcome, code = raw.handshake(hello(tokenizer_fingerprint=""))[:2]
        assert code == grpc.StatusCode.OK and welcome.tokenizer_fingerprint == fingerprint()
        assert_refused(raw.session([open_msg(fp="")]), grpc.StatusCode.FAILED_PRECONDITION)
        why = assert_refused(
            raw.handshake(hello(target_identity="0" * 64)), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert "expects target" in why
        w, code, _ = raw.handshake(hello(target_identity=main.target.identity()))
        assert code == grpc.StatusCode.OK
        assert (w.vocab_size, w.n_ctx, w.max_draft) == (VOCAB, 1024, 4)
        assert w.protocol_version == wire.PROTOCOL_VERSION
    # the client refuses the same way, before any session
    for other in (ByteTokenizer(301), TinyTokenizer(VOCAB)):
        with pytest.raises(ConfigError, match="FAILED_PRECONDITION.*tokenizer") as info:
            RemoteVerifier([address(main)], other, timeout=5, retry_for=1)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="FAILED_PRECONDITION.*expects target") as info:
        RemoteVerifier([address(main)], tok, expect_identity="f" * 64, timeout=5, retry_for=1)
    assert "\n" not in str(info.value)
    v = RemoteVerifier([address(main)], tok, expect_identity=main.target.identity(), timeout=5)
    v.shutdown()
    assert not main.scheduler.sessions
    good(main)


# ---- 3. session messages ----


def sampled(temperature: float = 1.0) -> pb.Sampling:
    return pb.Sampling(temperature=temperature)


def q_row(ids: list[int], counts: list[int]) -> pb.QRow:
    return pb.QRow(ids=ids, counts=counts)


BAD_SESSIONS = {
    "empty stream": ([], grpc.StatusCode.INVALID_ARGUMENT),
    "draft first": ([draft_msg([1, 2])], grpc.StatusCode.INVALID_ARGUMENT),
    "close first": ([close_msg()], grpc.StatusCode.INVALID_ARGUMENT),
    "open twice": ([open_msg(), open_msg()], grpc.StatusCode.INVALID_ARGUMENT),
    "draft id == vocab": ([open_msg(), draft_msg([5, VOCAB])], grpc.StatusCode.INVALID_ARGUMENT),
    "draft id 2**32-1": ([open_msg(), draft_msg([2**32 - 1])], grpc.StatusCode.INVALID_ARGUMENT),
    "draft id after good rounds": (
        [open_msg(), draft_msg([], 0), draft_msg([], 1), draft_msg([7, 4000], 2)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "prompt id == vocab": ([open_msg([1, 2, VOCAB])], grpc.StatusCode.INVALID_ARGUMENT),
    "prompt id 2**32-1": ([open_msg([2**32 - 1])], grpc.StatusCode.INVALID_ARGUMENT),
    "empty prompt": ([open_msg([])], grpc.StatusCode.INVALID_ARGUMENT),
    "5 draft tokens, max 4": (
        [open_msg(), draft_msg([1, 2, 3, 4, 5])],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "6 pipelined tokens, max 4 + guess": (
        [open_msg(), draft_msg([1, 2, 3, 4, 5, 6], pipelined=True)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "5 tokens over 2 chains, max 4": (
        [
            open_msg(),
            pb.ClientMsg(
                draft=pb.Draft(chains=[pb.Chain(tokens=[1, 2, 3]), pb.Chain(tokens=[4, 5])])
            ),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "empty chain": (
        [open_msg(), pb.ClientMsg(draft=pb.Draft(chains=[pb.Chain()]))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "stale version 5": ([open_msg(), draft_msg([1, 2], 5)], grpc.StatusCode.FAILED_PRECONDITION),
    "stale version 2**64-1": (
        [open_msg(), draft_msg([], 2**64 - 1)],
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    "repeated version": (
        [open_msg(), draft_msg([], 0), draft_msg([], 0)],
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    "q counts sum != 65536": (
        [open_msg(sampling=sampled()), draft_msg([5], q=[q_row([5, 6], [100, 200])])],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "q count 0": (
        [open_msg(sampling=sampled()), draft_msg([5], q=[q_row([5, 6], [Q_TOTAL, 0])])],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "q counts overflow to 65536": (
        [
            open_msg(sampling=sampled()),
            draft_msg([5], q=[q_row([5, 6], [2**32 - 1, Q_TOTAL + 1])]),  # 2**32 + 2**16
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "token not in q ids": (
        [open_msg(sampling=sampled()), draft_msg([5], q=[q_row([6], [Q_TOTAL])])],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "duplicated q ids": (
        [open_msg(sampling=sampled()), draft_msg([5], q=[q_row([5, 5], [Q_TOTAL // 2] * 2)])],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "q id outside vocab": (
        [open_msg(sampling=sampled()), draft_msg([5], q=[q_row([5, VOCAB], [Q_TOTAL - 1, 1])])],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "q ids without counts": (
        [open_msg(sampling=sampled()), draft_msg([5], q=[q_row([5], [])])],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "empty q row": (
        [open_msg(sampling=sampled()), draft_msg([5], q=[q_row([], [])])],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "fewer q rows than tokens": (
        [open_msg(sampling=sampled()), draft_msg([5, 6], q=[q_row([5], [Q_TOTAL])])],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "q on a greedy session": (
        [open_msg(), draft_msg([5], q=[q_row([5], [Q_TOTAL])])],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "temperature -1": ([open_msg(sampling=sampled(-1.0))], grpc.StatusCode.INVALID_ARGUMENT),
    "temperature nan": ([open_msg(sampling=sampled(math.nan))], grpc.StatusCode.INVALID_ARGUMENT),
    "temperature inf": ([open_msg(sampling=sampled(math.inf))], grpc.StatusCode.INVALID_ARGUMENT),
    "top_p 2": (
        [open_msg(sampling=pb.Sampling(temperature=1.0, top_p=2.0))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "min_p 1": (
        [open_msg(sampling=pb.Sampling(temperature=1.0, min_p=1.0))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    # 0 is read as "off" (an unset proto3 double); anything else outside (0, 1] is refused
    "top_p -1": (
        [open_msg(sampling=pb.Sampling(temperature=1.0, top_p=-1.0))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "top_p nan": (
        [open_msg(sampling=pb.Sampling(temperature=1.0, top_p=math.nan))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "top_p -inf": (
        [open_msg(sampling=pb.Sampling(temperature=1.0, top_p=-math.inf))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "prompt fills n_ctx": ([open_msg([1] * 1024)], grpc.StatusCode.INVALID_ARGUMENT),
    "prompt beyond n_ctx": ([open_msg([1] * 5000)], grpc.StatusCode.INVALID_ARGUMENT),
    "join an unknown session": (
        [pb.ClientMsg(open=pb.Open(join_session_id="nope", join_token="x"))],
        grpc.StatusCode.NOT_FOUND,
    ),
}


@pytest.mark.parametrize("case", list(BAD_SESSIONS))
def test_bad_session_messages_are_refused(main, good, case):
    msgs, code = BAD_SESSIONS[case]
    with Raw(main) as raw:
        assert_refused(raw.session(msgs), code)
    wait_for(lambda: not main.scheduler.sessions, what="the refused session to end")
    good(main, n=8)


def test_good_rounds_then_refusal_keeps_earlier_verdicts(main, reference, good):
    """Plain rounds answered in order with the reference tokens, then a stale one refused."""
    want = reference(3).token_ids
    with Raw(main) as raw:
        out, code, details = raw.session(
            [open_msg(), draft_msg([], 0), draft_msg([want[1]], 1), draft_msg([], 1)]
        )
    assert out[0].WhichOneof("msg") == "opened" and out[0].opened.version == 0
    assert [m.verdict.version for m in out[1:]] == [1, 2]
    assert out[1].verdict.next_token == want[0]
    assert (out[2].verdict.n_accepted, out[2].verdict.next_token) == (1, want[2])
    assert_refused((code, details), grpc.StatusCode.FAILED_PRECONDITION)
    wait_for(lambda: not main.scheduler.sessions, what="the session to end")
    good(main)


def test_oversized_message(main, good):
    big = open_msg([VOCAB - 1] * 2_200_000)  # ids of 2 bytes each: > 4 MiB
    assert big.ByteSize() > 4 << 20
    with Raw(main) as raw:
        assert_refused(raw.session([big]), grpc.StatusCode.RESOURCE_EXHAUSTED)
        huge_draft = draft_msg([VOCAB - 1] * 2_200_000)
        assert_refused(raw.session([open_msg(), huge_draft]), grpc.StatusCode.RESOURCE_EXHAUSTED)
    wait_for(lambda: not main.scheduler.sessions, what="the sessions to end")
    good(main)


# bytes that do not decode as the RPC's message: a truncated varint, a string that is not
# UTF-8, a length past the end, a bare end-group tag
UNDECODABLE = [b"\x08", b"\x12\x02\xff\xfe", b"\x0a\x09ab", b"\x0c"]


def raw_call(srv: SpecsplitServer, rpc: str, payloads: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Send payloads as they are (no serializer) to an RPC; how the call ended."""
    same = lambda b: b  # noqa: E731
    path = f"/specsplit.v1.Verifier/{rpc}"
    with grpc.insecure_channel(address(srv)) as channel:
        try:
            if rpc == "Handshake":
                channel.unary_unary(path, request_serializer=same, response_deserializer=same)(
                    payloads[0], timeout=CALL_TIMEOUT
                )
            elif rpc in ("Generate", "Vocabulary"):
                call = channel.unary_stream(
                    path, request_serializer=same, response_deserializer=same
                )
                list(call(payloads[0], timeout=CALL_TIMEOUT))
            else:
                call = channel.stream_stream(
                    path, request_serializer=same, response_deserializer=same
                )
                list(call(iter(payloads), timeout=CALL_TIMEOUT))
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def test_undecodable_messages_are_invalid_argument(main, good):
    """A message that does not parse is the client's fault: INVALID_ARGUMENT with a one-line
    reason, not gRPC's own INTERNAL "Exception deserializing request!" (which clients take
    for a server failure and retry elsewhere)."""
    good_open = open_msg().SerializeToString()
    for payload in UNDECODABLE:
        for rpc, payloads in (
            ("Handshake", [payload]),
            ("Generate", [payload]),
            ("Session", [payload]),
            ("Session", [good_open, payload]),
            ("Session", [good_open, draft_msg([], 0).SerializeToString(), payload]),
        ):
            why = assert_refused(raw_call(main, rpc, payloads), grpc.StatusCode.INVALID_ARGUMENT)
            assert "malformed" in why, why
    wait_for(lambda: not main.scheduler.sessions, what="the refused sessions to end")
    good(main)


def test_every_rpc_of_the_proto_is_served(main):
    """The service registers its handlers itself (lenient deserializers): none of the .proto's
    RPCs may be left out (UNIMPLEMENTED)."""
    for method in pb.DESCRIPTOR.services_by_name["Verifier"].methods:
        code, why = raw_call(main, method.name, [UNDECODABLE[0]])
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.name, code, why)


# ---- 4. limits ----


def test_session_limit(servers, good):
    srv = servers(max_sessions=2)
    with Raw(srv) as raw:
        with raw.stream(open_msg()) as s1, raw.stream(open_msg()) as s2:
            assert s1.recv().WhichOneof("msg") == "opened"
            assert s2.recv().WhichOneof("msg") == "opened"
            assert len(srv.scheduler.sessions) == 2
            why = assert_refused(raw.session([open_msg()]), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "maximum of 2 sessions" in why
            assert len(srv.scheduler.sessions) == 2
            s1.send(close_msg())
            s1.half_close()
            with pytest.raises(StopIteration):
                s1.recv()
            wait_for(lambda: len(srv.scheduler.sessions) == 1, what="one session to close")
            with raw.stream(open_msg()) as s3:
                assert s3.recv().WhichOneof("msg") == "opened"
                s3.send(draft_msg([], 0))
                assert s3.recv().verdict.version == 1
                assert len(srv.scheduler.sessions) == 2
            s2.send(draft_msg([], 0))
            assert s2.recv().verdict.version == 1
    wait_for(lambda: not srv.scheduler.sessions, what="every session to end")
    good(srv)


def test_rate_limit(servers, good):
    srv = servers(rate=5.0)
    answered, t0 = 0, time.monotonic()
    with Raw(srv) as raw, raw.stream(open_msg()) as s:
        assert s.recv().WhichOneof("msg") == "opened"
        with pytest.raises(grpc.RpcError) as info:
            for version in range(80):  # plain decoding rounds, in lock step
                s.send(draft_msg([], version))
                assert s.recv().verdict.version == version + 1
                answered += 1
    elapsed = time.monotonic() - t0
    assert_refused((info.value.code(), info.value.details()), grpc.StatusCode.RESOURCE_EXHAUSTED)
    # a burst of 32 calls: the Open and 31 rounds, then 5 a second
    assert 31 <= answered <= 31 + 5 * elapsed + 1, (answered, elapsed)
    wait_for(lambda: not srv.scheduler.sessions, what="the limited session to end")
    time.sleep(2.2)  # the bucket refills 5 rounds a second; the good session needs 8
    good(srv, n=8, drafter=False)


# ---- 4b. exact values, Generate's fields, rounds of several drafters ----


def test_sampling_values_reach_the_server_exactly(main, tok):
    """The server's p uses exactly the request's settings (0.7 must not arrive as float32's
    0.699999988), for a session and for Generate."""
    params = SamplingParams(temperature=0.7, top_k=7, top_p=0.9, min_p=0.05)
    v = RemoteVerifier([address(main)], tok, timeout=5)
    try:
        v.open(PROMPT, params, 3)
        (served,) = main.scheduler.sessions.values()
        assert served.state.params == params
    finally:
        v.shutdown()
    sent = pb.GenerateRequest(prompt_ids=PROMPT, sampling=wire.sampling_to_pb(params))
    got = pb.GenerateRequest.FromString(sent.SerializeToString())  # as it crosses the wire
    assert main.service.generation_request(got).params == params
    wait_for(lambda: not main.scheduler.sessions, what="the session to end")


def test_generate_seed_zero_replays_and_zero_tokens_is_refused(main, model, tok, reference):
    """One rule with the HTTP face: max_new_tokens 0 is refused (unset: 128), seed 0 is the
    seed 0 (unset: a random one), so a seeded request replays the local engine's text."""
    params = SamplingParams(temperature=1.0)
    local = SpeculativeEngine(TorchBackend(model, tok))
    want = local.generate(GenerationRequest(PROMPT, 16, params, seed=0)).token_ids
    assert want != local.generate(GenerationRequest(PROMPT, 16, params, seed=1)).token_ids
    with Raw(main) as raw:
        why = assert_refused(
            raw.generate(pb.GenerateRequest(prompt_ids=PROMPT, max_new_tokens=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "max_new_tokens" in why
        out, code, _ = raw.generate(pb.GenerateRequest(prompt_ids=PROMPT))
        assert code == grpc.StatusCode.OK
        assert [t for c in out for t in c.token_ids] == reference(wire.DEFAULT_MAX_NEW).token_ids
        sampling = wire.sampling_to_pb(params)
        for _ in range(2):
            req = pb.GenerateRequest(
                prompt_ids=PROMPT, sampling=sampling, seed=0, max_new_tokens=16
            )
            out, code, _ = raw.generate(req)
            assert code == grpc.StatusCode.OK
            assert [t for c in out for t in c.token_ids] == want
            assert wire.stats_from_json(out[-1].stats_json).seed == 0


def join_msg(opened: pb.Opened) -> pb.ClientMsg:
    return pb.ClientMsg(
        open=pb.Open(
            join_session_id=opened.session_id,
            join_token=opened.join_token,
            tokenizer_fingerprint=fingerprint(),
        )
    )


def test_merged_round_keeps_within_max_draft(main, reference, good):
    """The owner's 3 draft tokens and a joined drafter's 4 make 7 > max_draft 4: the joiner's
    chain is cut to fit (not the owner's generation failed); both hear the accepted ids."""
    want = reference(3).token_ids
    wrong = [(t + 1) % VOCAB for t in want]
    with Raw(main) as raw, raw.stream(open_msg()) as owner:
        opened = owner.recv().opened
        with raw.stream(join_msg(opened)) as joiner:
            assert joiner.recv().WhichOneof("msg") == "opened"
            joiner.send(draft_msg(want[:2] + wrong[2:3] * 2, 0))  # the target's text first
            owner.send(draft_msg(wrong[:3], 0))  # wrong from its first token
            for verdict in (owner.recv().verdict, joiner.recv().verdict):
                assert verdict.version == 1
                # the joiner's chain was cut to 4 - 3 = 1 token, which the target accepts
                assert (verdict.n_accepted, list(verdict.accepted_ids)) == (1, want[:1])
                assert verdict.next_token == want[1]
    wait_for(lambda: not main.scheduler.sessions, what="the session to end")
    good(main)


class Gate:
    """Holds a server's target passes while closed (to widen a race window)."""

    def __init__(self, srv: SpecsplitServer) -> None:
        self.open, self.entered = threading.Event(), threading.Event()
        self.open.set()
        target = srv.scheduler.target
        inner = target.forward_batch

        def forward_batch(*args: Any, **kw: Any) -> Any:
            self.entered.set()
            self.open.wait(timeout=CALL_TIMEOUT)
            return inner(*args, **kw)

        target.forward_batch = forward_batch


def test_merged_round_carries_its_ids_when_the_joiner_leaves(servers, reference, good):
    """Whether a verdict carries the accepted ids is decided when its round is formed: a
    joiner leaving while the merged round is verified must not leave the owner to derive
    them from its own chain (it followed the joiner's)."""
    srv = servers()
    gate = Gate(srv)
    want = reference(3).token_ids
    with Raw(srv) as raw, raw.stream(open_msg()) as owner:
        opened = owner.recv().opened
        hub = srv.service.hubs[opened.session_id]
        joiner = raw.stream(join_msg(opened))
        assert joiner.recv().WhichOneof("msg") == "opened"
        gate.open.clear()
        gate.entered.clear()
        joiner.send(draft_msg(want[:2], 0))
        owner.send(draft_msg([], 0))  # the owner drafts nothing this round
        assert gate.entered.wait(CALL_TIMEOUT), "the merged round never reached the target"
        joiner.__exit__()  # the joiner leaves while its round is being verified
        wait_for(lambda: len(hub.members) == 1, what="the joiner to leave")
        gate.open.set()
        verdict = owner.recv().verdict
        assert (verdict.n_accepted, verdict.next_token) == (2, want[2])
        assert list(verdict.accepted_ids) == want[:2]
    wait_for(lambda: not srv.scheduler.sessions, what="the session to end")
    good(srv)


# ---- 5. clients that vanish ----


def test_cancelled_call_ends_the_session(main, good):
    with Raw(main) as raw:
        with raw.stream(open_msg()) as s:
            assert s.recv().WhichOneof("msg") == "opened"
            s.send(draft_msg([], 0))
            assert s.recv().verdict.version == 1
            assert len(main.scheduler.sessions) == 1
            s.call.cancel()
            wait_for(lambda: not main.scheduler.sessions, what="the cancelled session to end")
        s = raw.stream(open_msg())
        assert s.recv().WhichOneof("msg") == "opened"
        assert len(main.scheduler.sessions) == 1
    s.q.put(None)
    # the channel closed under the open call
    wait_for(lambda: not main.scheduler.sessions, what="the orphaned session to end")
    good(main)


def test_idle_session_times_out(servers, good):
    srv = servers(idle_timeout=1.0)
    with Raw(srv) as raw, raw.stream(open_msg()) as s:
        assert s.recv().WhichOneof("msg") == "opened"
        t0 = time.monotonic()
        wait_for(lambda: not srv.scheduler.sessions, timeout=4.0, what="the idle timeout")
        assert time.monotonic() - t0 >= 0.5
        with pytest.raises(grpc.RpcError) as info:
            s.recv()
        why = assert_refused((info.value.code(), info.value.details()), grpc.StatusCode.ABORTED)
        assert "idle" in why
    good(srv)


# ---- 6, 7. servers that stop mid-generation ----


def stream_and_stop(loop: DecodeLoop, req: GenerationRequest, stop: Callable[[], None]):
    """Iterate loop.stream(req); call stop() after the third chunk. Returns the chunks and
    the exception that ended the stream (or None)."""
    chunks = []
    try:
        for chunk in loop.stream(req):
            chunks.append(chunk)
            if len(chunks) == 3:
                stop()
    except Exception as e:  # noqa: BLE001 - returned to the test
        return chunks, e
    return chunks, None


def test_failover_to_second_server(fresh_servers, model, draft_model, tok, reference):
    a = fresh_servers(copy.deepcopy(model))
    b = fresh_servers(copy.deepcopy(model))
    want = reference(64)
    v = RemoteVerifier([address(a), address(b)], tok, timeout=10, retry_for=10)
    loop = DecodeLoop(v, [DraftModelProposer(TorchBackend(draft_model, tok))], FixedK(3))
    stopped_with: list[int] = []

    def stop_a() -> None:
        stopped_with.append(len(a.scheduler.sessions))
        a.stop(grace=0)

    try:
        chunks, err = in_thread(
            lambda: stream_and_stop(loop, GenerationRequest(PROMPT, 64), stop_a)
        )
    finally:
        v.shutdown()
    assert err is None, repr(err)
    assert stopped_with == [1]
    res = chunks[-1].result
    assert res is not None and all(c.result is None for c in chunks[:-1])
    assert res.token_ids == want.token_ids
    assert res.text == want.text
    assert res.stats.reconnects >= 1
    assert "".join(c.text for c in chunks) == res.text
    assert [t for c in chunks for t in c.token_ids] == res.token_ids
    assert not a.scheduler.sessions
    wait_for(lambda: not b.scheduler.sessions, what="the resumed session to end")


def test_round_after_the_stream_ended_fails_at_once(fresh_servers, tok):
    """A round submitted once the session's stream has ended must fail (SessionGone, so the
    loop resumes elsewhere), not wait forever for a verdict nobody will send."""
    srv = fresh_servers()
    v = RemoteVerifier([address(srv)], tok, timeout=5, retry_for=1)
    try:
        v.open(PROMPT, GREEDY, 1)
        assert v.submit([], 0).result(timeout=10).version == 1
        srv.stop(grace=0)
        for _ in range(2):  # the first may still be queued on the dying stream; not the second
            with pytest.raises(SessionGone):
                v.submit([], 1).result(timeout=10)
    finally:
        v.shutdown()


def test_no_server_comes_back(fresh_servers, model, draft_model, tok, reference):
    srv = fresh_servers(copy.deepcopy(model))
    want = reference(64).token_ids
    v = RemoteVerifier([address(srv)], tok, timeout=5, retry_for=2)
    loop = DecodeLoop(v, [DraftModelProposer(TorchBackend(draft_model, tok))], FixedK(3))
    t0 = time.monotonic()
    try:
        chunks, err = in_thread(
            lambda: stream_and_stop(loop, GenerationRequest(PROMPT, 64), lambda: srv.stop(grace=0))
        )
    finally:
        v.shutdown()
    assert isinstance(err, Interrupted), repr(err)
    assert time.monotonic() - t0 < 20
    assert "\n" not in str(err)
    assert len(chunks) == 3
    assert 0 < len(err.token_ids) < len(want)
    assert err.token_ids == want[: len(err.token_ids)]
    assert err.text == tok.decode(err.token_ids)
    assert [t for c in chunks for t in c.token_ids] == err.token_ids


# ---- 8. protocol fuzz ----
# Mostly well-formed traffic (so that rounds reach verification), with hostile values mixed
# in: ids up to 2**32-1, versions up to 2**64-1, broken q rows, odd floats, stray messages.

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
ID = st.integers(0, VOCAB - 1)
ANY_ID = st.one_of(ID, st.integers(VOCAB - 2, VOCAB + 2), U32)
FLOAT = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, -1.0, 1e-30, 1e-45, 100.0, 101.0, 1e30]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
GOOD_SAMPLING = st.one_of(
    st.just(pb.Sampling()),
    st.builds(
        pb.Sampling,
        temperature=st.sampled_from([0.5, 1.0, 1.5]),
        top_k=st.integers(0, 8),
        top_p=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
        min_p=st.sampled_from([0.0, 0.1]),
    ),
)
ANY_SAMPLING = st.builds(
    pb.Sampling,
    temperature=FLOAT,
    top_k=st.one_of(st.integers(0, 5), U32),
    top_p=FLOAT,
    min_p=FLOAT,
)


def chance(draw, tenths: int) -> bool:
    """True about tenths/10 of the time (shrinks towards False)."""
    return draw(st.integers(0, 9)) >= 10 - tenths


def good_q_row(draw, token: int) -> pb.QRow:
    """A well-formed quantized q row with the token inside."""
    others = [i for i in draw(st.lists(ID, max_size=3, unique=True)) if i != token]
    ids = [token, *others]
    cuts = sorted(
        draw(
            st.lists(
                st.integers(1, Q_TOTAL - 1), min_size=len(others), max_size=len(others), unique=True
            )
        )
    )
    bounds = [0, *cuts, Q_TOTAL]
    return pb.QRow(ids=ids, counts=[b - a for a, b in zip(bounds, bounds[1:])])


def any_q_row(draw) -> pb.QRow:
    ids = draw(st.lists(ANY_ID, max_size=4))
    counts = draw(st.lists(st.one_of(st.integers(0, Q_TOTAL), U32), max_size=4))
    return pb.QRow(ids=ids, counts=counts)


def chain(draw, greedy: bool, longest: int) -> pb.Chain:
    ids = ANY_ID if chance(draw, 1) else st.one_of(st.integers(0, 3), ID)  # chains overlap often
    tokens = draw(st.lists(ids, min_size=1, max_size=longest))
    if greedy and not chance(draw, 1):
        return pb.Chain(tokens=tokens)
    if chance(draw, 1):
        return pb.Chain(
            tokens=tokens, q=[any_q_row(draw) for _ in tokens[: draw(st.integers(0, 6))]]
        )
    q = [good_q_row(draw, t) if t < VOCAB else any_q_row(draw) for t in tokens]
    if chance(draw, 1):
        q = draw(st.sampled_from([q[:-1], q + q[:1]]))
    return pb.Chain(tokens=tokens, q=q)


def open_any(draw) -> pb.Open:
    return pb.Open(
        prompt_ids=draw(st.lists(ANY_ID, max_size=8)),
        sampling=draw(ANY_SAMPLING),
        seed=draw(U64),
        tokenizer_fingerprint=draw(st.sampled_from([fingerprint(), "", "bytes:300"])),
        join_session_id=draw(st.one_of(st.just(""), st.text(max_size=8))),
        join_token=draw(st.text(max_size=4)),
    )


@st.composite
def fuzz_sessions(draw) -> list[pb.ClientMsg]:
    msgs: list[pb.ClientMsg] = []
    greedy = True
    if not chance(draw, 1):  # Open first, mostly a good one
        if chance(draw, 2):
            op = open_any(draw)
        else:
            op = pb.Open(
                prompt_ids=draw(st.lists(ID, min_size=1, max_size=8)),
                sampling=draw(GOOD_SAMPLING),
                seed=draw(U64),
                tokenizer_fingerprint=fingerprint(),
            )
        greedy = op.sampling.temperature == 0
        msgs.append(pb.ClientMsg(open=op))
    version = 0
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 29))
        if kind <= 25:
            pipelined = chance(draw, 3)
            v = draw(st.sampled_from([version, version, version + 1, max(version - 1, 0)]))
            if chance(draw, 1):
                v = draw(U64)
            n = draw(st.sampled_from([1, 1, 1, 0, 2, 3]))
            longest = 4 + pipelined if n == 1 else 2  # the fuzzed server's max_draft is 4
            chains = [chain(draw, greedy, longest) for _ in range(n)]
            d = pb.Draft(version=v, chains=chains, pipelined=pipelined)
            msgs.append(pb.ClientMsg(draft=d))
            version += not pipelined
        elif kind <= 27:
            msgs.append(pb.ClientMsg(close=pb.Close()))
        elif kind == 28:
            msgs.append(pb.ClientMsg(open=open_any(draw)))
        else:
            msgs.append(pb.ClientMsg())  # no message set
    return msgs


@st.composite
def fuzz_generate(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        sampling=draw(ANY_SAMPLING if chance(draw, 2) else GOOD_SAMPLING),
        seed=draw(U64),
        max_new_tokens=draw(st.integers(1, 6)),
        server_draft=draw(st.booleans()),
    )
    which = draw(st.integers(0, 9))
    if which <= 5:
        req.prompt_ids.extend(PROMPT if which == 0 else draw(st.lists(ID, min_size=1, max_size=6)))
    elif which <= 7:
        req.prompt = draw(st.text(min_size=1, max_size=8))
    elif which == 8:
        req.prompt_ids.extend(draw(st.lists(ANY_ID, max_size=6)))
        req.prompt = draw(st.text(max_size=4))
    if chance(draw, 2):
        req.stop.extend(draw(st.lists(st.text(max_size=3), max_size=2)))
    return req


@pytest.fixture(scope="module")
def fuzzed(servers) -> SpecsplitServer:
    return servers(max_draft=4)


def check_ended_well(got: tuple) -> None:
    *_, code, details = got
    assert code not in UNEXPECTED, f"{code}: {details!r}"
    if code != grpc.StatusCode.OK:
        assert details.strip() and "\n" not in details, repr(details)


FUZZ = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def test_fuzz_session(fuzzed, good):
    """Random session streams end normally or with a chosen status; none leaks a session;
    afterwards the server still serves a good session exactly."""

    @settings(max_examples=60, **FUZZ)
    @given(msgs=fuzz_sessions())
    def one(msgs: list[pb.ClientMsg]) -> None:
        with Raw(fuzzed) as raw:
            got = raw.session(msgs)
        check_ended_well(got)
        out, code, _ = got
        verdicts = [m.verdict for m in out[1:]]
        event(f"{code.name}, {min(len(verdicts), 2) if out else 'no'} verdicts")
        if out:
            assert out[0].WhichOneof("msg") == "opened" and out[0].opened.version == 0
            assert all(m.WhichOneof("msg") == "verdict" for m in out[1:])
        assert len(verdicts) <= sum(m.WhichOneof("msg") == "draft" for m in msgs)
        version = 0
        for v in verdicts:  # versions count the rounds verified; a dropped one changes nothing
            assert v.version == version + (not v.dropped)
            assert v.next_token < VOCAB
            version = v.version

    one()
    wait_for(
        lambda: not fuzzed.scheduler.sessions and not fuzzed.service.hubs,
        what="every fuzzed session to end",
    )
    good(fuzzed)


def test_fuzz_generate(fuzzed, reference, good):
    """Random Generate requests: refused with a chosen status or answered correctly."""

    @settings(max_examples=25, **FUZZ)
    @given(req=fuzz_generate())
    def one(req: pb.GenerateRequest) -> None:
        with Raw(fuzzed) as raw:
            got = raw.generate(req)
        check_ended_well(got)
        out, code, _ = got
        event(code.name)
        if code == grpc.StatusCode.OK:
            assert out[-1].finish_reason in ("length", "stop", "eos")
            assert all(not c.finish_reason for c in out[:-1])
            ids = [t for c in out for t in c.token_ids]
            assert len(ids) <= req.max_new_tokens
            if list(req.prompt_ids) == PROMPT and req.sampling.temperature == 0 and not req.stop:
                assert ids == reference(req.max_new_tokens).token_ids

    one()
    wait_for(lambda: not fuzzed.scheduler.sessions, what="every generation to end")
    good(fuzzed)
