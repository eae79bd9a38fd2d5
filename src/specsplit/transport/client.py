"""The edge side: a ``Verifier`` whose target is a specsplit server across the network.

Rounds go out on one bidirectional gRPC stream per session and their verdicts come back in
order; a reader thread resolves each round's future. If the stream breaks (the server
stopped, the network failed), pending rounds fail with ``SessionGone`` and the decoding loop
calls ``open`` again with the token ids it has committed: the next server in the list (or
the same one, once it is back) rebuilds the session from those ids, not from text.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import grpc

from specsplit.backends.base import Tokenizer
from specsplit.engine.verifier import Outcome, Verifier
from specsplit.errors import (
    ConfigError,
    Overloaded,
    SessionGone,
    SpecsplitError,
    VerifierUnavailable,
)
from specsplit.proposers.base import Draft
from specsplit.randomness import drafter_uniform
from specsplit.sampling import SamplingParams
from specsplit.transport import wire
from specsplit.transport.pb import specsplit_pb2 as pb
from specsplit.transport.pb import specsplit_pb2_grpc as pb_grpc

log = logging.getLogger("specsplit.client")

MAX_MESSAGE = 4 << 20  # bytes; the server refuses larger ones too
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 20_000),
]
# statuses after which another attempt (same or next server) may succeed
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


def _error(e: grpc.RpcError) -> SpecsplitError:
    """A gRPC failure as an engine error: retryable ones end the session, others are final."""
    code, details = e.code(), e.details() or ""
    if code in RETRYABLE:
        return SessionGone(f"{code.name}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"server: {details}")
    return ConfigError(f"server refused ({code.name}): {details}")


class _Link:
    """One channel to one server, after a successful handshake."""

    def __init__(
        self,
        address: str,
        tokenizer: Tokenizer,
        auth_token: str | None,
        tls_ca: bytes | None,
        expect_identity: str | None,
        timeout: float,
    ) -> None:
        self.address = address
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self.channel = grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.VerifierStub(self.channel)
        self.metadata = [("authorization", f"Bearer {auth_token}")] if auth_token else []
        hello = pb.Hello(
            protocol_version=wire.PROTOCOL_VERSION,
            tokenizer_fingerprint=tokenizer.fingerprint(),
            target_identity=expect_identity or "",
        )
        self.bytes_out = hello.ByteSize() + wire.GRPC_FRAME
        try:
            t0 = time.perf_counter()
            self.welcome: pb.Welcome = self.stub.Handshake(
                hello, metadata=self.metadata, timeout=timeout
            )
            self.rtt = time.perf_counter() - t0
        except grpc.RpcError as e:
            self.channel.close()
            raise _error(e) from None
        self.bytes_in = self.welcome.ByteSize() + wire.GRPC_FRAME

    def close(self) -> None:
        self.channel.close()


class RemoteVerifier(Verifier):
    """Verification on a specsplit server (the first of ``servers`` that answers)."""

    pipelines = True
    remote = True

    def __init__(
        self,
        servers: Sequence[str],
        tokenizer: Tokenizer,
        *,
        auth_token: str | None = None,
        tls_ca_file: str | None = None,
        expect_identity: str | None = None,
        timeout: float = 30.0,
        retry_for: float = 15.0,
    ) -> None:
        if not servers:
            raise ConfigError("give at least one server as HOST:PORT")
        self.servers = list(servers)
        self.tokenizer = tokenizer
        self.auth_token = auth_token
        self.tls_ca = Path(tls_ca_file).read_bytes() if tls_ca_file else None
        self.timeout, self.retry_for = timeout, retry_for
        self.expect_identity = expect_identity
        self.link = self._connect()
        w = self.link.welcome
        self.identity = w.target_identity  # a resumed session must find the same target
        self.vocab_size, self.n_ctx, self.max_draft = w.vocab_size, w.n_ctx, w.max_draft
        self.cost_shape = {c.n: c.micros / wire.MICROS for c in w.verify_cost}
        self.rtt = self.link.rtt
        self.session_id = ""
        self.join_token = ""
        self.reconnects = 0
        self._bytes_out = self._bytes_in = 0
        self._call = None
        self._sendq: queue.Queue | None = None
        self._pending: deque[tuple[Future[Outcome], list[list[int]], bool]] = deque()
        self._ended: SpecsplitError | None = None  # why the current stream ended, once it has
        self._lock = threading.Lock()

    # ---- connecting ----

    def _connect(self) -> _Link:
        """Handshake with the first server that answers; retry the list for retry_for seconds."""
        deadline = time.monotonic() + self.retry_for
        delay, last = 0.1, ""
        while True:
            for address in self.servers:
                try:
                    link = _Link(
                        address,
                        self.tokenizer,
                        self.auth_token,
                        self.tls_ca,
                        getattr(self, "identity", None) or self.expect_identity,
                        min(self.timeout, 5.0),
                    )
                except SessionGone as e:
                    last = f"{address}: {e}"
                    continue
                return link
            if time.monotonic() + delay > deadline:
                raise VerifierUnavailable(f"no verification server answered ({last})")
            time.sleep(delay)
            delay = min(2 * delay, 1.0)

    # ---- the Verifier protocol ----

    def open(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int) -> None:
        """Open a session with the committed ids; on failure, reconnect and try again."""
        self._shutdown_call()
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                self._open_on(self.link, prompt_ids, params, seed)
                return
            except SessionGone as e:
                log.info("opening on %s failed (%s); reconnecting", self.link.address, e)
                self._shutdown_call()
                if time.monotonic() > deadline:
                    raise VerifierUnavailable(f"could not open a session: {e}") from None
                self._relink()

    def _relink(self) -> None:
        self._bytes_out += self.link.bytes_out
        self._bytes_in += self.link.bytes_in
        self.link.close()
        self.link = self._connect()
        self.reconnects += 1

    def _open_on(
        self, link: _Link, prompt_ids: Sequence[int], params: SamplingParams, seed: int
    ) -> None:
        self._sendq = queue.Queue()
        pending: deque[tuple[Future[Outcome], list[list[int]], bool]] = deque()
        with self._lock:  # each stream answers its own rounds only
            self._pending, self._ended = pending, None
        first = pb.ClientMsg(
            open=pb.Open(
                prompt_ids=[int(t) for t in prompt_ids],
                sampling=wire.sampling_to_pb(params),
                seed=seed,
                tokenizer_fingerprint=self.tokenizer.fingerprint(),
            )
        )
        self._send(first)
        call = link.stub.Session(self._requests(self._sendq), metadata=link.metadata)
        self._call = call
        try:
            msg = next(call)
        except grpc.RpcError as e:
            raise _error(e) from None
        except StopIteration:
            raise SessionGone("the server closed the session at once") from None
        self._count_in(msg)
        if msg.WhichOneof("msg") != "opened":
            raise SessionGone("the server did not answer Open with Opened")
        self.session_id, self.join_token = msg.opened.session_id, msg.opened.join_token
        threading.Thread(target=self._read, args=(call, pending), daemon=True).start()

    @staticmethod
    def _requests(q: queue.Queue) -> Iterator[pb.ClientMsg]:
        while True:
            msg = q.get()
            if msg is None:
                return
            yield msg

    def _send(self, msg: pb.ClientMsg) -> None:
        assert self._sendq is not None
        with self._lock:
            self._bytes_out += msg.ByteSize() + wire.GRPC_FRAME
        self._sendq.put(msg)

    def _count_in(self, msg: pb.ServerMsg) -> None:
        with self._lock:
            self._bytes_in += msg.ByteSize() + wire.GRPC_FRAME

    def _read(self, call, pending: deque) -> None:
        """Resolve pending rounds from the verdicts, in order (runs in its own thread)."""
        err: SpecsplitError = SessionGone("the server ended the session")
        try:
            for msg in call:
                self._count_in(msg)
                with self._lock:
                    if not pending or msg.WhichOneof("msg") != "verdict":
                        continue
                    fut, chains, pipelined = pending.popleft()
                try:
                    fut.set_result(wire.verdict_from_pb(msg.verdict, chains, pipelined))
                except SpecsplitError as e:
                    fut.set_exception(e)
        except grpc.RpcError as e:
            err = _error(e)
        with self._lock:
            if pending is self._pending:  # rounds submitted from now on fail at once
                self._ended = err
            left = list(pending)
            pending.clear()
        for fut, _, _ in left:
            if not fut.done():
                fut.set_exception(err)

    def submit(
        self, drafts: Sequence[Draft], version: int, pipelined: bool = False
    ) -> Future[Outcome]:
        chains = wire.drafts_to_pb(drafts)
        fut: Future[Outcome] = Future()
        with self._lock:
            if self._ended is not None:  # the stream is gone: nobody would answer this round
                fut.set_exception(self._ended)
                return fut
            self._pending.append((fut, [list(c.tokens) for c in chains], pipelined))
        self._send(
            pb.ClientMsg(draft=pb.Draft(version=version, chains=chains, pipelined=pipelined))
        )
        return fut

    def _shutdown_call(self) -> None:
        if self._sendq is not None:
            self._sendq.put(None)
            self._sendq = None
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def close(self) -> None:
        if self._sendq is not None:
            self._send(pb.ClientMsg(close=pb.Close()))
        self._shutdown_call()

    def shutdown(self) -> None:
        """Close the session and the channel."""
        self.close()
        self.link.close()

    def traffic(self) -> tuple[int, int]:
        return (
            self._bytes_out + self.link.bytes_out,
            self._bytes_in + self.link.bytes_in,
        )


def generate_cloud(
    server: str,
    tokenizer_fingerprint: str,
    *,
    prompt: str = "",
    prompt_ids: Sequence[int] = (),
    max_new_tokens: int = 128,
    params: SamplingParams | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    server_draft: bool = False,
    auth_token: str | None = None,
    tls_ca_file: str | None = None,
    timeout: float | None = None,
) -> Iterator[pb.GenerateChunk]:
    """Cloud-only: the server generates alone (or with its own drafter) and streams chunks;
    the last one carries finish_reason and the statistics as JSON."""
    ca = Path(tls_ca_file).read_bytes() if tls_ca_file else None
    creds = grpc.ssl_channel_credentials(root_certificates=ca) if ca is not None else None
    channel = (
        grpc.secure_channel(server, creds, options=CHANNEL_OPTIONS)
        if creds is not None
        else grpc.insecure_channel(server, options=CHANNEL_OPTIONS)
    )
    stub = pb_grpc.VerifierStub(channel)
    metadata = [("authorization", f"Bearer {auth_token}")] if auth_token else []
    try:
        stub.Handshake(
            pb.Hello(
                protocol_version=wire.PROTOCOL_VERSION, tokenizer_fingerprint=tokenizer_fingerprint
            ),
            metadata=metadata,
            timeout=10.0,
        )
        req = pb.GenerateRequest(
            prompt=prompt,
            prompt_ids=[int(t) for t in prompt_ids],
            sampling=wire.sampling_to_pb(params or SamplingParams()),
            seed=seed or 0,
            max_new_tokens=max_new_tokens,
            stop=list(stop),
            server_draft=server_draft,
        )
        yield from stub.Generate(req, metadata=metadata, timeout=timeout)
    except grpc.RpcError as e:
        err = _error(e)
        if isinstance(err, SessionGone):
            raise VerifierUnavailable(f"{server}: {err}") from None
        raise err from None
    finally:
        channel.close()


def join_and_draft(
    server: str,
    session_id: str,
    join_token: str,
    proposer,  # noqa: ANN001 - a Proposer
    tokenizer: Tokenizer,
    k: int = 4,
    params: SamplingParams | None = None,
    *,
    auth_token: str | None = None,
    seed: int = 0,
) -> int:
    """Join another client's session as one more drafter: draft k tokens for every round
    until the session ends. Returns the rounds this drafter took part in."""
    link = _Link(server, tokenizer, auth_token, None, None, 10.0)
    sendq: queue.Queue = queue.Queue()
    sendq.put(
        pb.ClientMsg(
            open=pb.Open(
                join_session_id=session_id,
                join_token=join_token,
                tokenizer_fingerprint=tokenizer.fingerprint(),
            )
        )
    )
    call = link.stub.Session(RemoteVerifier._requests(sendq), metadata=link.metadata)
    u = drafter_uniform(seed)
    params = params or SamplingParams()
    rounds = 0
    try:
        opened = next(call).opened
        committed, version = list(opened.committed_ids), opened.version
        while True:
            draft = proposer.propose(committed, k, params, u)
            chains = wire.drafts_to_pb([draft])
            sendq.put(pb.ClientMsg(draft=pb.Draft(version=version, chains=chains)))
            verdict = next(call).verdict
            if verdict.dropped or verdict.version <= version:
                continue  # a round already in the snapshot it joined with
            committed += [*verdict.accepted_ids, verdict.next_token]
            version = verdict.version
            rounds += 1
    except (StopIteration, grpc.RpcError):
        return rounds  # the session ended
    finally:
        sendq.put(None)
        call.cancel()
        link.close()
