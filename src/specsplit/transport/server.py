"""The specsplit server: the gRPC verification service and the HTTP face over one scheduler.

``SpecsplitServer(target, ...)`` owns a ``BatchScheduler`` on the target, serves
``proto/specsplit.proto`` on a gRPC port (optionally TLS, optionally a bearer token) and the
OpenAI-style HTTP face on an HTTP port, where the server drafts for itself (n-gram or a
draft model it loads), with ``/health``, Prometheus ``/metrics`` (read from the scheduler at
scrape time), ``/status`` and the page at ``/``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from fastapi import FastAPI
from prometheus_client import generate_latest

from specsplit.backends.base import Backend
from specsplit.engine.scheduler import BatchScheduler, ScheduledVerifier
from specsplit.engine.speculative import DecodeLoop, GenerationRequest, calibrate
from specsplit.errors import ConfigError
from specsplit.proposers.base import Proposer
from specsplit.transport.http_face import FaceConfig, HTTPFace, create_app
from specsplit.transport.http_face.metrics import server_registry
from specsplit.transport.http_face.status import DrafterTally, server_status
from specsplit.transport.keys import Keys
from specsplit.transport.link import MAX_MESSAGE
from specsplit.transport.service import VerifierService, add_to_server

log = logging.getLogger("specsplit.server")

# RPCs beyond the long ones (handshakes, refusals) that gRPC serves at once: its own limit
# ("Concurrent RPC limit exceeded!") is this far above the servicer's "server full" refusal
SHORT_RPCS = 32


@dataclass
class ServerConfig:
    """Where to listen and the limits (``specsplit serve --help`` says each)."""

    host: str = "127.0.0.1"
    port: int = 50051  # gRPC; 0 = any free port
    http_port: int | None = None  # the HTTP face; None = off, 0 = any free port
    http_body_timeout: float = 10.0  # seconds for an HTTP request body to arrive whole (408)
    auth_token: str | None = None  # one shared key (the --auth-token-file)
    keys: Keys | None = None  # API keys with names, rates and quotas (the --keys-file)
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    max_sessions: int = 64
    max_streams: int | None = (
        None  # session streams (joined ones too) + Generate calls; None: 2x sessions
    )
    max_batch: int = 8
    max_draft: int = 16
    kv_budget: int | None = None  # bytes of KV cache, all sessions together
    idle_timeout: float = 300.0
    rate: float | None = 200.0  # calls (rounds, requests) per second per key or client
    prefill_chunk: int = 256
    batch_window: float = 0.005
    calibrate: bool = True  # measure target pass costs at start (sent in the handshake)


class _Auth(grpc.ServerInterceptor):
    """Refuses every RPC without ``authorization: Bearer <key>`` of a known key."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

        def deny(request: object, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")

        self._deny = deny

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001, ANN201
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if self.keys.check(got) is not None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self._deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(self._deny)
        return grpc.unary_unary_rpc_method_handler(self._deny)


class SpecsplitServer:
    """A running server: ``start()``, then ``stop()`` (graceful)."""

    def __init__(
        self,
        target: Backend,
        target_name: str,
        config: ServerConfig | None = None,
        make_proposers: Callable[[], Sequence[Proposer]] = list,
    ) -> None:
        self.config = c = config or ServerConfig()
        if (c.tls_cert is None) != (c.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        self.target = target
        shape = calibrate(target, [target.tokenizer.bos_token_id or 0] * 32) if c.calibrate else {}
        self.scheduler = BatchScheduler(
            target,
            max_batch=c.max_batch,
            max_sessions=c.max_sessions,
            max_draft=c.max_draft,
            kv_budget=c.kv_budget,
            prefill_chunk=c.prefill_chunk,
            batch_window=c.batch_window,
            idle_timeout=c.idle_timeout,
            cost_shape=shape,
        )
        if c.keys is not None and c.auth_token is not None:
            raise ConfigError("give either a keys file or one auth token, not both")
        self.keys = c.keys or (
            Keys.single(c.auth_token, c.rate) if c.auth_token else Keys.open(c.rate)
        )
        self.service = VerifierService(
            self.scheduler,
            target_name,
            make_proposers=make_proposers,
            keys=self.keys,
            max_streams=c.max_streams,
        )
        self.make_proposers = make_proposers
        self.registry = server_registry(self.scheduler, self.service.counters, self.keys)
        self.drafter = DrafterTally("+".join(p.name for p in make_proposers()) or "none")
        self.grpc: grpc.Server | None = None
        self.http: HTTPFace | None = None
        self.port = c.port
        self.stopped = threading.Event()

    def start(self) -> None:
        c = self.config
        self.scheduler.start()
        # every long RPC holds one thread; the servicer refuses those past its limit itself
        rpcs = self.service.streams.limit + SHORT_RPCS
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=rpcs),
            interceptors=[_Auth(self.keys)] if self.keys.required else [],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ],
            maximum_concurrent_rpcs=rpcs,
        )
        add_to_server(self.service, self.grpc)
        address = f"{c.host}:{c.port}"
        if c.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(c.tls_key, c.tls_cert)])
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise ConfigError(f"could not listen on {address}")
        self.grpc.start()
        if c.http_port is not None:
            self.http = HTTPFace(self.http_app(), host=c.host, port=c.http_port)
            self.http.start()
        log.info(
            "serving target=%s grpc=%s:%d http=%s tls=%s auth=%s",
            self.service.target_name,
            c.host,
            self.port,
            self.http.port if self.http else "off",
            c.tls_cert is not None,
            self.keys.required,
        )

    def http_app(self) -> FastAPI:
        """The OpenAI-style face over this server's scheduler, as an ASGI app (served by
        ``HTTPFace`` here; any ASGI server can mount it)."""
        c = self.config
        config = FaceConfig(
            n_ctx=self.target.n_ctx,
            body_timeout=c.http_body_timeout,
            concurrency=None,  # every request is its own session of the scheduler
            threads=c.max_sessions + 8,
        )
        return create_app(
            self._generate,
            self.target.tokenizer,
            self.service.target_name,
            config,
            registry=self.registry,
            health=self.health,
            status=self.status,
            keys=self.keys,
        )

    def _generate(self, req: GenerationRequest):  # noqa: ANN202
        """The HTTP face's generate function: a session of the scheduler, server drafting."""
        loop = DecodeLoop(ScheduledVerifier(self.scheduler), self.make_proposers())
        return self.drafter.watch(loop.stream(req))

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking new work, let rounds in flight finish for ``grace`` seconds, then end."""
        if self.http is not None:
            self.http.stop(grace)
        if self.grpc is not None:
            self.grpc.stop(grace).wait()
        self.scheduler.stop()
        self.stopped.set()

    def health(self) -> dict:
        return {
            "target": self.service.target_name,
            "sessions": len(self.scheduler.sessions),
            "kv_bytes": self.scheduler.kv_bytes(),
        }

    def metrics_text(self) -> str:
        """Prometheus text exposition of the server's counters (what ``/metrics`` serves)."""
        return generate_latest(self.registry).decode()

    def status(self) -> dict:
        """The server panel's numbers (``/status``)."""
        return server_status(
            self.scheduler, self.service.target_name, self.service.counters, [self.drafter]
        )
