"""The gRPC verification service: messages in, engine calls, messages out.

No decoding logic lives here: sessions and batching are the engine's ``BatchScheduler``;
this module checks every message, maps errors to gRPC status codes with a one-line reason,
and hands rounds to each session's ``hub.Hub``, which routes verdicts back to its client
streams (several, when other drafters joined it with its id and join token). A server going
away on purpose (``drain``) tells its open sessions to move and refuses new ones, with
UNAVAILABLE and a reason beginning "session moved:" (``wire.MOVED``).
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from specsplit.backends.vocab_file import vocab_blob
from specsplit.engine.scheduler import BatchScheduler, ScheduledVerifier
from specsplit.engine.speculative import Chunk, DecodeLoop, GenerationRequest
from specsplit.engine.verifier import Outcome, tree_paths
from specsplit.errors import (
    ConfigError,
    Overloaded,
    ServerFull,
    SessionGone,
    SpecsplitError,
    StaleDraft,
)
from specsplit.proposers.base import Proposer
from specsplit.transport import wire
from specsplit.transport.hub import Hub, Member
from specsplit.transport.keys import Keys, Principal
from specsplit.transport.pb import specsplit_pb2 as pb
from specsplit.transport.pb import specsplit_pb2_grpc as pb_grpc

log = logging.getLogger("specsplit.server")

VOCAB_CHUNK = 1 << 20  # bytes of the vocabulary file per message


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


def reason_of(e: BaseException) -> str:
    """The one-line reason for an engine error ("server full: ..." where another server may
    serve: clients then try their next one)."""
    return f"{wire.FULL} {e}" if isinstance(e, ServerFull) else str(e)


class Malformed:
    """A request whose bytes do not decode as its message (refused with INVALID_ARGUMENT).

    gRPC answers a request its deserializer cannot parse with INTERNAL ("Exception
    deserializing request!"), which clients read as a server failure and retry elsewhere; the
    service's deserializers hand this over instead, and the servicer refuses it."""

    def __init__(self, message: str, error: DecodeError) -> None:
        self.reason = f"malformed {message} message: {' '.join(str(error).split())}"


def _lenient(cls: type) -> Callable[[bytes], object]:
    """cls.FromString, but undecodable bytes give a ``Malformed`` instead of an exception."""

    def parse(data: bytes) -> object:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Malformed(cls.DESCRIPTOR.name, e)

    return parse


def add_to_server(service: VerifierService, server: grpc.Server) -> None:
    """Register the service's RPCs (as the generated ``add_VerifierServicer_to_server`` does,
    with deserializers that let the servicer refuse undecodable bytes itself)."""
    handlers = {
        "Handshake": grpc.unary_unary_rpc_method_handler(
            service.Handshake,
            request_deserializer=_lenient(pb.Hello),
            response_serializer=pb.Welcome.SerializeToString,
        ),
        "Session": grpc.stream_stream_rpc_method_handler(
            service.Session,
            request_deserializer=_lenient(pb.ClientMsg),
            response_serializer=pb.ServerMsg.SerializeToString,
        ),
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate,
            request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateChunk.SerializeToString,
        ),
        "Vocabulary": grpc.unary_stream_rpc_method_handler(
            service.Vocabulary,
            request_deserializer=_lenient(pb.VocabularyRequest),
            response_serializer=pb.VocabularyChunk.SerializeToString,
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["Verifier"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


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


class Streams:
    """Counts the long RPCs (session streams, joined or not, and Generate calls) and refuses
    the one past ``limit`` with "server full", so that gRPC's own limits (threads, concurrent
    RPCs; sized above this in ``server``) never answer first."""

    def __init__(self, limit: int) -> None:
        self.limit, self.n = limit, 0
        self._lock = threading.Lock()

    def take(self, context: grpc.ServicerContext) -> bool:
        """Count this RPC until it ends; False if the limit is reached."""
        with self._lock:
            if self.n >= self.limit:
                return False
            self.n += 1
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if not done.is_set():
                    done.set()
                    self.n -= 1

        if not context.add_callback(release):  # the RPC already ended
            release()
        return True


class VerifierService(pb_grpc.VerifierServicer):
    """The Verifier service of proto/specsplit.proto over a batch scheduler."""

    def __init__(
        self,
        scheduler: BatchScheduler,
        target_name: str,
        *,
        make_proposers: Callable[[], Sequence[Proposer]] = list,
        keys: Keys | None = None,
        max_streams: int | None = None,
    ) -> None:
        self.scheduler = scheduler
        t = scheduler.target
        self.tokenizer = t.tokenizer
        self.fingerprint = t.tokenizer.fingerprint()
        self.identity = t.identity()
        self.target_name = target_name
        self.make_proposers = make_proposers
        self.keys = keys or Keys.open(None)  # who may call, at what rate, with what quota
        self.counters = Counters()
        # session streams (owners and joined drafters) and Generate calls at once
        self.streams = Streams(max_streams or 2 * scheduler.max_sessions)
        self.hubs: dict[str, Hub] = {}
        self.moving: str | None = None  # "session moved: why", once drain() was called
        self._vocab: bytes | None = None
        self._vocab_lock = threading.Lock()
        self._lock = threading.Lock()

    # ---- helpers ----

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> None:
        self.counters.refused[code.name] += 1
        log.info("refused peer=%s code=%s reason=%r", context.peer(), code.name, reason)
        context.abort(code, reason)

    def _refuse_error(self, context: grpc.ServicerContext, e: SpecsplitError) -> None:
        self._refuse(context, status_of(e), reason_of(e))

    def _principal(self, context: grpc.ServicerContext) -> Principal:
        """Who this call is from, admitted for one more call (rate and quota)."""
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        p = self.keys.principal(auth, context.peer().rsplit(":", 1)[0])
        try:
            p.admit()
        except Overloaded as e:
            self._refuse_error(context, e)
        return p

    def _check_decoded(self, msg: object, context: grpc.ServicerContext) -> None:
        if isinstance(msg, Malformed):
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, msg.reason)

    def _refuse_if_moving(self, context: grpc.ServicerContext) -> None:
        if self.moving is not None:
            self._refuse(context, grpc.StatusCode.UNAVAILABLE, self.moving)

    def drain(self, reason: str) -> int:
        """Going away on purpose: from now on refuse handshakes, sessions and Generate calls
        with "session moved: reason", and tell every open session stream (joined drafters
        too) to move, after the verdicts of the rounds it already sent. Returns the number
        of streams told. Their clients resume elsewhere from the token ids they hold."""
        with self._lock:
            self.moving = f"{wire.MOVED} {reason}"
            members = [m for hub in self.hubs.values() for m in list(hub.members)]
        for m in members:
            m.out.put(Refused(grpc.StatusCode.UNAVAILABLE, self.moving))
        log.info("draining reason=%r streams_told=%d", reason, len(members))
        return len(members)

    def _take_stream(self, context: grpc.ServicerContext) -> None:
        if not self.streams.take(context):
            self._refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{wire.FULL} the server holds its maximum of {self.streams.limit} streams",
            )

    def _check_client(
        self, fingerprint: str, context: grpc.ServicerContext, handshake: bool = False
    ) -> None:
        """The client's vocabulary is the target's (a handshake may send none: the client
        then takes the server's, from Welcome and the Vocabulary call)."""
        if fingerprint != self.fingerprint and not (handshake and not fingerprint):
            self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the client's tokenizer ({fingerprint[:12] or 'none'}) is not the vocabulary "
                f"of this server's target {self.target_name} ({self.fingerprint[:12]}): draft "
                "with a model of that vocabulary, or with ngram (which needs no model)",
            )

    # ---- Handshake ----

    def Handshake(self, request: pb.Hello, context: grpc.ServicerContext) -> pb.Welcome:
        self._check_decoded(request, context)
        self.counters.add(request.ByteSize() + wire.GRPC_FRAME)
        self._refuse_if_moving(context)
        if request.protocol_version != wire.PROTOCOL_VERSION:
            self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version}; this server speaks {wire.PROTOCOL_VERSION}",
            )
        self._check_client(request.tokenizer_fingerprint, context, handshake=True)
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
            tree_paths=tree_paths(t),
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
        self._take_stream(context)
        self._refuse_if_moving(context)
        first = next(request_iterator, None)
        self._check_decoded(first, context)
        if first is None or first.WhichOneof("msg") != "open":
            self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Open"
            )
        self.counters.add(first.ByteSize() + wire.GRPC_FRAME)
        principal = self._principal(context)
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
        if not member.joined and served.state.first is not None:
            opened.first_token = served.state.first
            principal.used(1)  # a generated token, as the ones a verdict commits
        yield self._out(pb.ServerMsg(opened=opened))
        reader = threading.Thread(
            target=self._read,
            args=(request_iterator, hub, member, context, principal),
            daemon=True,
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
            fut, with_ids = item  # with_ids: fixed when the round was formed
            try:
                outcome: Outcome = fut.result()
            except SpecsplitError as e:
                self._leave(hub, member, str(e))
                self._refuse_error(context, e)
            if not outcome.dropped and not member.joined:  # (joiners hear the same tokens)
                principal.used(outcome.n_accepted + 1)
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
            with self._lock:  # drain() told this member, or it sees moving here
                moving = self.moving
            if moving is not None:
                hub.leave(member)
                self._refuse(context, grpc.StatusCode.UNAVAILABLE, moving)
            member.snapshot = hub.served.state.snapshot()
            return hub, member
        self._check_client(req.tokenizer_fingerprint, context)
        try:
            params = wire.sampling_from_pb(req.sampling)
            served = self.scheduler.open(
                list(req.prompt_ids), params, int(req.seed), first=req.first_token
            )
        except SpecsplitError as e:
            self._refuse_error(context, e)
        remaining = context.time_remaining()
        try:
            served.ready.result(timeout=remaining if remaining and remaining < 1e6 else None)
        except SpecsplitError as e:
            self.scheduler.close(served, str(e))
            self._refuse_error(context, e)
        except TimeoutError:
            self.scheduler.close(served, "deadline")
            self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline while prefilling")
        if not context.is_active():  # the client left while its prompt was prefilled
            self.scheduler.close(served, "client went away")
            self._refuse(context, grpc.StatusCode.CANCELLED, "client went away")
        hub = Hub(self.scheduler, served)
        with self._lock:
            moving = self.moving  # (checked with the lock: drain() sees every hub or none)
            if moving is None:
                self.hubs[served.id] = hub
        if moving is not None:
            self.scheduler.close(served, moving)
            self._refuse(context, grpc.StatusCode.UNAVAILABLE, moving)
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
        principal: Principal,
    ) -> None:
        """Read a session's messages and queue their rounds (runs in its own thread)."""
        greedy = hub.served.state.params.greedy
        vocab = self.scheduler.target.vocab_size
        try:
            for msg in requests:
                if isinstance(msg, Malformed):
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, msg.reason)
                self.counters.add(msg.ByteSize() + wire.GRPC_FRAME)
                kind = msg.WhichOneof("msg")
                if kind == "close":
                    break
                if kind != "draft":
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind} message")
                try:
                    principal.admit()
                except Overloaded as e:
                    raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
                d = msg.draft
                drafts = wire.drafts_from_pb(
                    d.chains,
                    vocab,
                    self.scheduler.max_draft + int(d.pipelined),
                    greedy,
                    tree_paths(self.scheduler.target),
                )
                hub.submit(member, drafts, int(d.version), d.pipelined)
            member.out.put(None)
        except Refused as e:
            member.out.put(e)
        except SpecsplitError as e:
            member.out.put(Refused(status_of(e), reason_of(e)))
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

    # ---- Vocabulary ----

    def Vocabulary(
        self, request: pb.VocabularyRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.VocabularyChunk]:
        self._check_decoded(request, context)
        self.counters.add(request.ByteSize() + wire.GRPC_FRAME)
        if request.tokenizer_fingerprint not in ("", self.fingerprint):
            self._refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server's vocabulary is {self.fingerprint[:12]}, "
                f"not {request.tokenizer_fingerprint[:12]}",
            )
        try:
            blob = self._vocab_blob()
        except SpecsplitError as e:
            self._refuse_error(context, e)
        for i in range(0, len(blob), VOCAB_CHUNK):
            msg = pb.VocabularyChunk(data=blob[i : i + VOCAB_CHUNK])
            self.counters.add(n_out=msg.ByteSize() + wire.GRPC_FRAME)
            yield msg

    def _vocab_blob(self) -> bytes:
        """The target's tokenizer as a gzipped vocabulary-only GGUF (made once)."""
        with self._vocab_lock:  # (not self._lock: making it takes seconds)
            if self._vocab is None:
                src = self.scheduler.target.source_gguf
                if src is None:
                    raise ConfigError(
                        f"this server's target {self.target_name} did not come from a GGUF, "
                        "so it cannot send its tokenizer: give the client a draft model"
                    )
                self._vocab = vocab_blob(src, self.fingerprint)
            return self._vocab

    # ---- Generate (cloud-only) ----

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateChunk]:
        self._check_decoded(request, context)
        self.counters.add(request.ByteSize() + wire.GRPC_FRAME)
        self._take_stream(context)
        self._refuse_if_moving(context)
        principal = self._principal(context)
        try:
            req = self.generation_request(request)
            proposers = self.make_proposers() if request.server_draft else []
            loop = DecodeLoop(ScheduledVerifier(self.scheduler), proposers)
            with closing(loop.stream(req)) as stream:  # closed: the session ends with the call
                for msg in self._chunks(stream, req, context):
                    principal.used(len(msg.token_ids))
                    yield msg
        except SpecsplitError as e:
            self._refuse_error(context, e)

    def _chunks(
        self, stream: Iterator[Chunk], req: GenerationRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateChunk]:
        first = True
        for chunk in stream:
            if not context.is_active():
                return
            self._refuse_if_moving(context)  # (the client resumes elsewhere from what it has)
            msg = pb.GenerateChunk(text=chunk.text, token_ids=chunk.token_ids)
            if first:  # the prompt as rendered here: a resume elsewhere sends these ids
                msg.prompt_ids.extend(int(t) for t in req.prompt_ids)
                first = False
            if chunk.result is not None:
                msg.finish_reason = chunk.result.finish_reason
                msg.stats_json = wire.stats_to_json(chunk.result.stats)
            self.counters.add(n_out=msg.ByteSize() + wire.GRPC_FRAME)
            yield msg

    def generation_request(self, m: pb.GenerateRequest) -> GenerationRequest:
        """A validated engine request from a Generate message (an unset max_new_tokens is
        128, an unset seed a random one; 0 is 0 for both, as on the HTTP face)."""
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
            int(m.max_new_tokens) if m.HasField("max_new_tokens") else wire.DEFAULT_MAX_NEW,
            wire.sampling_from_pb(m.sampling),
            int(m.seed) if m.HasField("seed") else None,
            tuple(m.stop),
            tuple(int(t) for t in m.resume_ids),
        )
