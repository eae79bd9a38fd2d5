"""The gRPC verification service: messages in, engine calls, messages out.

No decoding logic lives here: sessions and batching are the engine's ``BatchScheduler``;
this module checks every message, maps errors to gRPC status codes with a one-line reason,
and routes verdicts back to the client streams of each session (several, when other
drafters joined it with its id and join token).
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import grpc

from specsplit.engine.scheduler import BatchScheduler, ScheduledVerifier, Served
from specsplit.engine.speculative import DecodeLoop, GenerationRequest
from specsplit.engine.verifier import Outcome
from specsplit.errors import ConfigError, Overloaded, SessionGone, SpecsplitError, StaleDraft
from specsplit.proposers.base import Draft, Proposer
from specsplit.transport import wire
from specsplit.transport.pb import specsplit_pb2 as pb
from specsplit.transport.pb import specsplit_pb2_grpc as pb_grpc

log = logging.getLogger("specsplit.server")

JOIN_WAIT = 0.25  # seconds a joined session waits for every drafter's draft of a round


def status_of(e: BaseException) -> grpc.StatusCode:
    """The gRPC status for an engine error."""
    if isinstance(e, StaleDraft):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, SessionGone):
        return grpc.StatusCode.ABORTED
    if isinstance(e, ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class Refused(Exception):
    """Ends an RPC with a status code and a one-line reason."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class Counters:
    """What the metrics page shows besides the scheduler's own counters."""

    bytes_in: int = 0
    bytes_out: int = 0
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n_in: int = 0, n_out: int = 0) -> None:
        with self.lock:
            self.bytes_in += n_in
            self.bytes_out += n_out


class RateLimiter:
    """A token bucket per client: ``rate`` rounds per second, bursts of ``burst``."""

    def __init__(self, rate: float | None, burst: float = 32.0) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        if not self.rate:
            return True
        now = time.monotonic()
        with self._lock:
            level, t = self._buckets.get(client, (self.burst, now))
            level = min(self.burst, level + (now - t) * self.rate)
            if level < 1.0:
                self._buckets[client] = (level, now)
                return False
            self._buckets[client] = (level - 1.0, now)
            return True


@dataclass
class Member:
    """One client stream drafting for a session."""

    out: queue.Queue  # futures of outcomes (with the chains sent) to answer, in order
    joined: bool  # joined an existing session (needs the accepted ids)
    snapshot: tuple[list[int], int] = ([], 0)  # committed ids and version when it joined


class Hub:
    """A served session and the client streams drafting for it."""

    def __init__(self, scheduler: BatchScheduler, served: Served) -> None:
        self.scheduler, self.served = scheduler, served
        self.join_token = secrets.token_urlsafe(16)
        self.members: list[Member] = []
        self.lock = threading.Lock()
        self._pending: dict[int, list[Draft]] = {}  # version -> drafts gathered
        self._from: dict[int, set[int]] = {}  # version -> ids of members that sent
        self._timers: dict[int, threading.Timer] = {}
        self._early: dict[int, list[Draft]] = {}  # joiners' drafts before the owner's round
        self._inflight = 0  # the owner's rounds at the scheduler while it drafts alone
        self._inflight_lock = threading.Lock()
        self._next = 0  # the lowest version not yet sent for verification (joined sessions)
        self._rounds: dict[int, Future[Outcome]] = {}  # version -> its verdict, every member hears

    def join(self, joined: bool) -> Member:
        """Add a client stream. A joining one starts hearing every round from now on; rounds
        sent before it joined finish first, so a snapshot taken after this is consistent."""
        m = Member(queue.Queue(), joined)
        with self.lock:
            self.members.append(m)
            for version in sorted(self._rounds):
                m.out.put(self._rounds[version])
        deadline = time.monotonic() + 10.0
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.005)
        return m

    def leave(self, m: Member) -> bool:
        """Remove a member; True if the session should end (its owner or everyone left)."""
        with self.lock:
            if m in self.members:
                self.members.remove(m)
            return not m.joined or not self.members

    def _single_done(self, _: Future) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    def submit(self, m: Member, drafts: list[Draft], version: int, pipelined: bool) -> None:
        """Queue a round. Alone, the owner's rounds go straight to the scheduler; with joined
        drafters, the owner's draft opens the round and theirs join it (until JOIN_WAIT)."""
        with self.lock:
            if len(self.members) == 1:
                fut = self.scheduler.submit(self.served, drafts, version, pipelined)
                with self._inflight_lock:
                    self._inflight += 1
                fut.add_done_callback(self._single_done)
                m.out.put(fut)
                return
            if pipelined:  # no drafting ahead with several drafters: answer "dropped", in order
                dropped: Future[Outcome] = Future()
                dropped.set_result(Outcome(version, True, 0, -1))
                m.out.put(dropped)
                return
            if version < self._next or id(m) in self._from.get(version, set()):
                return  # late: the round went to verification without this draft
            self._from.setdefault(version, set()).add(id(m))
            if m.joined:
                self._early.setdefault(version, []).extend(drafts)
                if version not in self._rounds:
                    return  # the owner has not sent this round yet
            else:
                if version in self._rounds:
                    raise ConfigError(f"a second round at version {version}")
                self._rounds[version] = Future()
                for member in self.members:
                    member.out.put(self._rounds[version])
                self._pending[version] = [*drafts, *self._early.pop(version, [])]
                for old in [v for v in self._early if v < version]:
                    del self._early[old]
            if m.joined:
                self._pending[version].extend(self._early.pop(version, []))
            if len(self._from[version]) >= len(self.members):
                self._fire(version)
            elif version not in self._timers:
                t = threading.Timer(JOIN_WAIT, self._fire_later, (version,))
                t.daemon = True
                self._timers[version] = t
                t.start()

    def _fire_later(self, version: int) -> None:
        with self.lock:
            if version in self._pending:
                self._fire(version)

    def _fire(self, version: int) -> None:
        """Verify every drafter's draft of a round in one pass; every member hears it."""
        drafts = self._pending.pop(version)
        self._from.pop(version, None)
        self._next = max(self._next, version + 1)  # later drafts for this version are late
        t = self._timers.pop(version, None)
        if t is not None:
            t.cancel()
        out = self._rounds[version]

        def done(f: Future[Outcome]) -> None:
            with self.lock:
                self._rounds.pop(version, None)
            if f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(f.result())

        try:
            self.scheduler.submit(self.served, drafts, version).add_done_callback(done)
        except SpecsplitError as e:
            self._rounds.pop(version, None)
            out.set_exception(e)


class VerifierService(pb_grpc.VerifierServicer):
    """The Verifier service of proto/specsplit.proto over a batch scheduler."""

    def __init__(
        self,
        scheduler: BatchScheduler,
        target_name: str,
        *,
        make_proposers: Callable[[], Sequence[Proposer]] = list,
        rate: float | None = None,
    ) -> None:
        self.scheduler = scheduler
        t = scheduler.target
        self.tokenizer = t.tokenizer
        self.fingerprint = t.tokenizer.fingerprint()
        self.identity = t.identity()
        self.target_name = target_name
        self.make_proposers = make_proposers
        self.limiter = RateLimiter(rate)
        self.counters = Counters()
        self.hubs: dict[str, Hub] = {}
        self._lock = threading.Lock()

    # ---- helpers ----

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> None:
        self.counters.refused[code.name] += 1
        log.info("refused peer=%s code=%s reason=%r", context.peer(), code.name, reason)
        context.abort(code, reason)

    def _check_client(self, fingerprint: str, context: grpc.ServicerContext) -> None:
        if fingerprint != self.fingerprint:
            self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "the client's tokenizer does not match the server's target "
                f"({fingerprint[:12] or 'none'} vs {self.fingerprint[:12]})",
            )

    # ---- Handshake ----

    def Handshake(self, request: pb.Hello, context: grpc.ServicerContext) -> pb.Welcome:
        self.counters.add(request.ByteSize() + wire.GRPC_FRAME)
        if request.protocol_version != wire.PROTOCOL_VERSION:
            self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version}; this server speaks {wire.PROTOCOL_VERSION}",
            )
        self._check_client(request.tokenizer_fingerprint, context)
        if request.target_identity and request.target_identity != self.identity:
            self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the client expects target {request.target_identity[:12]}; "
                f"this server has {self.identity[:12]} ({self.target_name})",
            )
        t = self.scheduler.target
        reply = pb.Welcome(
            protocol_version=wire.PROTOCOL_VERSION,
            target_identity=self.identity,
            tokenizer_fingerprint=self.fingerprint,
            target_name=self.target_name,
            vocab_size=t.vocab_size,
            n_ctx=t.n_ctx,
            max_draft=self.scheduler.max_draft,
            verify_cost=[
                pb.CostPoint(n=n, micros=int(s * wire.MICROS))
                for n, s in sorted(self.scheduler.cost_shape.items())
            ],
        )
        self.counters.add(n_out=reply.ByteSize() + wire.GRPC_FRAME)
        return reply

    # ---- Session ----

    def Session(
        self, request_iterator: Iterator[pb.ClientMsg], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMsg]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "open":
            self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Open"
            )
        self.counters.add(first.ByteSize() + wire.GRPC_FRAME)
        hub, member = self._open(first.open, context)
        served = hub.served
        context.add_callback(lambda: self._leave(hub, member, "client went away"))
        if not context.is_active():  # it left before the callback was in place
            self._leave(hub, member, "client went away")
            return
        opened = pb.Opened(
            session_id=served.id,
            join_token=hub.join_token if not member.joined else "",
            version=member.snapshot[1] if member.joined else served.state.version,
            committed_ids=member.snapshot[0] if member.joined else [],
            load_micros=int(self.scheduler.load_hint() * wire.MICROS),
        )
        yield self._out(pb.ServerMsg(opened=opened))
        reader = threading.Thread(
            target=self._read, args=(request_iterator, hub, member, context), daemon=True
        )
        reader.start()
        while True:
            try:
                item = member.out.get(timeout=1.0)
            except queue.Empty:
                if served.closed:
                    self._refuse(
                        context, grpc.StatusCode.ABORTED, f"session ended: {served.end_reason}"
                    )
                continue
            if item is None:  # the client closed its side
                self._leave(hub, member, "closed")
                return
            if isinstance(item, Refused):
                self._leave(hub, member, str(item))
                self._refuse(context, item.code, str(item))
            try:
                outcome: Outcome = item.result()
            except SpecsplitError as e:
                self._leave(hub, member, str(e))
                self._refuse(context, status_of(e), str(e))
            with_ids = member.joined or len(hub.members) > 1
            yield self._out(pb.ServerMsg(verdict=wire.verdict_to_pb(outcome, with_ids)))

    def _out(self, msg: pb.ServerMsg) -> pb.ServerMsg:
        self.counters.add(n_out=msg.ByteSize() + wire.GRPC_FRAME)
        return msg

    def _open(self, req: pb.Open, context: grpc.ServicerContext) -> tuple[Hub, Member]:
        if req.join_session_id:
            with self._lock:
                hub = self.hubs.get(req.join_session_id)
            if hub is None:
                self._refuse(context, grpc.StatusCode.NOT_FOUND, "no such session")
            if not hmac.compare_digest(req.join_token, hub.join_token):
                self._refuse(context, grpc.StatusCode.PERMISSION_DENIED, "wrong join token")
            self._check_client(req.tokenizer_fingerprint, context)
            member = hub.join(joined=True)
            member.snapshot = hub.served.state.snapshot()
            return hub, member
        self._check_client(req.tokenizer_fingerprint, context)
        try:
            params = wire.sampling_from_pb(req.sampling)
            served = self.scheduler.open(list(req.prompt_ids), params, int(req.seed))
        except SpecsplitError as e:
            self._refuse(context, status_of(e), str(e))
        remaining = context.time_remaining()
        try:
            served.ready.result(timeout=remaining if remaining and remaining < 1e6 else None)
        except SpecsplitError as e:
            self.scheduler.close(served, str(e))
            self._refuse(context, status_of(e), str(e))
        except TimeoutError:
            self.scheduler.close(served, "deadline")
            self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline while prefilling")
        if not context.is_active():  # the client left while its prompt was prefilled
            self.scheduler.close(served, "client went away")
            self._refuse(context, grpc.StatusCode.CANCELLED, "client went away")
        hub = Hub(self.scheduler, served)
        with self._lock:
            self.hubs[served.id] = hub
        log.info(
            "session open id=%s peer=%s prompt_tokens=%d temperature=%g",
            served.id,
            context.peer(),
            len(req.prompt_ids),
            params.temperature,
        )
        return hub, hub.join(joined=False)

    def _read(
        self,
        requests: Iterator[pb.ClientMsg],
        hub: Hub,
        member: Member,
        context: grpc.ServicerContext,
    ) -> None:
        """Read a session's messages and queue their rounds (runs in its own thread)."""
        client = context.peer().rsplit(":", 1)[0]
        greedy = hub.served.state.params.greedy
        vocab = self.scheduler.target.vocab_size
        try:
            for msg in requests:
                self.counters.add(msg.ByteSize() + wire.GRPC_FRAME)
                kind = msg.WhichOneof("msg")
                if kind == "close":
                    break
                if kind != "draft":
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind} message")
                if not self.limiter.allow(client):
                    raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit: too many rounds")
                d = msg.draft
                drafts = wire.drafts_from_pb(
                    d.chains, vocab, self.scheduler.max_draft + int(d.pipelined), greedy
                )
                hub.submit(member, drafts, int(d.version), d.pipelined)
            member.out.put(None)
        except Refused as e:
            member.out.put(e)
        except SpecsplitError as e:
            member.out.put(Refused(status_of(e), str(e)))
        except grpc.RpcError:
            member.out.put(None)  # the stream broke: the callback ends the session
        except Exception as e:  # a malformed stream must not kill the server
            log.exception("session reader failed")
            member.out.put(Refused(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"))

    def _leave(self, hub: Hub, member: Member, reason: str) -> None:
        if hub.leave(member):
            self.scheduler.close(hub.served, reason)
            with self._lock:
                if self.hubs.pop(hub.served.id, None) is not None:
                    log.info("session end id=%s reason=%r", hub.served.id, reason)

    # ---- Generate (cloud-only) ----

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateChunk]:
        self.counters.add(request.ByteSize() + wire.GRPC_FRAME)
        try:
            req = self.generation_request(request)
            proposers = self.make_proposers() if request.server_draft else []
            loop = DecodeLoop(ScheduledVerifier(self.scheduler), proposers)
            stream = loop.stream(req)
            for chunk in stream:
                if not context.is_active():
                    stream.close()
                    return
                msg = pb.GenerateChunk(text=chunk.text, token_ids=chunk.token_ids)
                if chunk.result is not None:
                    msg.finish_reason = chunk.result.finish_reason
                    msg.stats_json = json.dumps(chunk.result.stats.as_dict())
                self.counters.add(n_out=msg.ByteSize() + wire.GRPC_FRAME)
                yield msg
        except SpecsplitError as e:
            self._refuse(context, status_of(e), str(e))

    def generation_request(self, m: pb.GenerateRequest) -> GenerationRequest:
        """A validated engine request from a Generate message."""
        if bool(m.prompt_ids) == bool(m.prompt):
            raise ConfigError("give exactly one of prompt_ids and prompt")
        ids = list(m.prompt_ids)
        if m.prompt:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": m.prompt}])
            ids = (
                self.tokenizer.encode(rendered, add_special=False)
                if rendered is not None
                else self.tokenizer.encode(m.prompt)
            )
        return GenerationRequest(
            ids,
            int(m.max_new_tokens) or 128,
            wire.sampling_from_pb(m.sampling),
            int(m.seed) if m.seed else None,
            tuple(m.stop),
        )
