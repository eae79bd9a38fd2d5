"""The edge side: a ``Verifier`` whose target is a specsplit server across the network.

Rounds go out on one bidirectional gRPC stream per session and their verdicts come back in
order; a reader thread resolves each round's future. If the stream breaks (the server
stopped, the network failed), pending rounds fail with ``SessionGone`` and the decoding loop
calls ``open`` again with the token ids it has committed: the next server in the list (or
the same one, once it is back) rebuilds the session from those ids, not from text. A server
that says the session moved (``SessionMoved``: a Ray replica going away) is left at once: a
new handshake at the same address places the session on another replica.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import grpc

from specsplit.backends.base import Tokenizer
from specsplit.engine.verifier import Outcome, Verifier
from specsplit.errors import ModelError, ServerFull, SessionGone, SessionMoved, SpecsplitError
from specsplit.proposers.base import Draft
from specsplit.randomness import drafter_uniform
from specsplit.sampling import SamplingParams
from specsplit.transport import wire
from specsplit.transport.cloud import generate_cloud
from specsplit.transport.link import MAX_MESSAGE, Failover, Link, error_of, is_loopback
from specsplit.transport.pb import specsplit_pb2 as pb
from specsplit.transport.vocabulary import server_tokenizer

__all__ = ["MAX_MESSAGE", "RemoteVerifier", "generate_cloud", "join_and_draft"]

log = logging.getLogger("specsplit.client")


class RemoteVerifier(Verifier):
    """Verification on a specsplit server: the first of ``servers`` that answers, then the
    next ones in turn when it fails or is full. Each server's handshake sets the limits the
    loop keeps to (``max_draft`` per round, ``n_ctx``). With no tokenizer the client takes
    the server's target's (``adopt``); a drafter's tokenizer must be that vocabulary."""

    pipelines = True
    remote = True

    def __init__(
        self,
        servers: Sequence[str],
        tokenizer: Tokenizer | None = None,
        *,
        fetch_tokenizer: bool = True,
        auth_token: str | None = None,
        tls_ca_file: str | None = None,
        expect_identity: str | None = None,
        timeout: float = 30.0,
        retry_for: float = 15.0,
    ) -> None:
        self.failover = Failover(servers, retry_for)
        self.servers = self.failover.servers
        self.tokenizer = tokenizer
        self.auth_token = auth_token
        self.tls_ca = Path(tls_ca_file).read_bytes() if tls_ca_file else None
        self.timeout, self.retry_for = timeout, retry_for
        self.expect_identity = expect_identity
        self.identity: str | None = None
        self.link = self._connect()
        self.identity = self.link.welcome.target_identity  # resumed sessions: the same target
        self.target_name = self.link.welcome.target_name
        self.fingerprint = self.link.welcome.tokenizer_fingerprint  # the target's vocabulary
        if tokenizer is None and fetch_tokenizer:  # (else the caller adopts one)
            self.adopt()
        self.rtt = self.link.rtt
        self.session_id = ""
        self.join_token = ""
        self.reconnects = 0
        self.moved = 0  # sessions the server told to move (each one resumed elsewhere)
        self._bytes_out = self._bytes_in = 0
        self._call = None
        self._sendq: queue.Queue | None = None
        self._pending: deque[tuple[Future[Outcome], list[list[int]], bool]] = deque()
        self._ended: SpecsplitError | None = None  # why the current stream ended, once it has
        self._lock = threading.Lock()

    @property
    def shares_cpus(self) -> bool:
        """The server in use is on this machine (loopback): its passes share our cores."""
        return is_loopback(self.failover.address)

    # ---- connecting ----

    def _connect(self) -> Link:
        """Handshake with the server in use, else the next ones in turn (for retry_for
        seconds); take its limits."""
        while True:
            try:
                link = Link(
                    self.failover.address,
                    self.tokenizer.fingerprint() if self.tokenizer is not None else "",
                    self.auth_token,
                    self.tls_ca,
                    self.identity or self.expect_identity,
                    min(self.timeout, 5.0),
                )
            except (SessionGone, ServerFull) as e:  # (a server run with gRPC's own limit)
                self.failover.failed(str(e))
                continue
            w = link.welcome
            self.vocab_size, self.n_ctx, self.max_draft = w.vocab_size, w.n_ctx, w.max_draft
            self.tree_paths = w.tree_paths  # (0 from a server without trees)
            self.cost_shape = {c.n: c.micros / wire.MICROS for c in w.verify_cost}
            return link

    def adopt(self, tokenizer: Tokenizer | None = None) -> Tokenizer:
        """Use tokenizer (a draft model's, which must be the target's vocabulary), or with
        None the server's own (fetched once, then cached). Needed before ``open``."""
        if tokenizer is None:
            tokenizer = server_tokenizer(self.link)
        if tokenizer.fingerprint() != self.fingerprint:
            raise ModelError(
                f"the drafter's vocabulary ({tokenizer.fingerprint()[:12]}) is not the one of "
                f"the server's target {self.target_name} ({self.fingerprint[:12]}): draft with "
                "a model of that vocabulary, or with ngram (which needs no model)"
            )
        self.tokenizer = tokenizer
        return tokenizer

    # ---- the Verifier protocol ----

    def open(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int, first: bool = False
    ) -> int | None:
        """Open a session with the committed ids on the server in use; if it is gone or
        full, on the next ones in turn (VerifierUnavailable names each one and why). If the
        last stream ended with "session moved", or broke on a replica the handshake placed it
        on (a Ray deployment), handshake again first: a new placement. With ``first`` the
        server's prefill decides the first new token, returned."""
        ended = self._ended
        self._shutdown_call()
        if isinstance(ended, SessionMoved):
            self.moved += 1
        placed = self.link.session_address != self.link.address
        if isinstance(ended, SessionMoved) or (ended is not None and placed):
            self._relink()
        while True:
            try:
                token = self._open_on(self.link, prompt_ids, params, seed, first)
                self.failover.ok()
                return token
            except (SessionGone, ServerFull) as e:
                log.info("opening on %s failed (%s); trying the next server", self.link.address, e)
                self._shutdown_call()
                self.failover.failed(str(e))
                self._relink()

    def _relink(self) -> None:
        self._bytes_out += self.link.bytes_out
        self._bytes_in += self.link.bytes_in
        self.link.close()
        self.link = self._connect()
        self.reconnects += 1

    def _open_on(
        self,
        link: Link,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        seed: int,
        first: bool = False,
    ) -> int | None:
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
                first_token=first,
            )
        )
        self._send(first)
        call = link.stub.Session(self._requests(self._sendq), metadata=link.metadata)
        self._call = call
        try:
            msg = next(call)
        except grpc.RpcError as e:
            raise error_of(e) from None
        except StopIteration:
            raise SessionGone("the server closed the session at once") from None
        self._count_in(msg)
        if msg.WhichOneof("msg") != "opened":
            raise SessionGone("the server did not answer Open with Opened")
        self.session_id, self.join_token = msg.opened.session_id, msg.opened.join_token
        threading.Thread(target=self._read, args=(call, pending), daemon=True).start()
        return msg.opened.first_token if msg.opened.HasField("first_token") else None

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
            err = error_of(e)
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
    """Join another client's session as one more drafter: draft k tokens (at most the
    server's max_draft) for every round until the session ends. Returns the rounds this
    drafter took part in."""
    link = Link(server, tokenizer.fingerprint(), auth_token, None, None, 10.0, session_id)
    k = min(k, link.welcome.max_draft)
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
