"""One Ray Serve replica of the verification service: ``SpecsplitReplica``.

The replica builds its server (``spec.ClusterSpec.server_factory``: target, batch scheduler,
gRPC service) and starts its gRPC port for sessions on the node. Through Serve it answers:

- ``Handshake`` (Serve's gRPC proxy, routed by ``router.SessionRouter``): the server's own
  checks (protocol, vocabulary, target identity), the key, room for a new session, and the
  address of this replica's session port in ``Welcome.session_address``;
- the HTTP face (Serve's HTTP proxy, ``@serve.ingress``): the server's ASGI app, its requests
  batched by this replica's scheduler;
- ``record_routing_stats`` / ``record_autoscaling_stats``: open sessions, for placement and
  scaling;
- ``__del__`` (Serve calls it once a stopping replica's HTTP requests are done): refuse new
  sessions, tell the open ones to move, wait for them, stop.

Session, Generate and Vocabulary calls through Serve's proxy are refused: they go to the
address the handshake names.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time

import grpc
from ray import serve
from ray.util import get_node_ip_address

from specsplit.cluster.metrics import ReplicaGauges
from specsplit.transport import wire
from specsplit.transport.pb import specsplit_pb2 as pb
from specsplit.transport.service import Refused

log = logging.getLogger("specsplit.cluster")

LEAVING = "this replica is leaving (scale-down or redeploy)"


def load_factory(path: str):  # noqa: ANN201 - the factory
    """'module:function' -> the function."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def advertised_host(host: str) -> str:
    """The host clients reach this replica's session port at: the bound address, or the
    node's address when bound to every interface."""
    return get_node_ip_address() if host in ("", "0.0.0.0", "::", "[::]") else host


class _ServeContext:
    """Serve's gRPC context as the servicer context ``VerifierService.Handshake`` uses:
    ``abort`` sets the status on Serve's context and raises ``Refused``."""

    def __init__(self, ctx) -> None:  # noqa: ANN001 - RayServegRPCContext
        self.ctx = ctx

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.ctx.set_code(code)
        self.ctx.set_details(details)
        raise Refused(code, details)

    def peer(self) -> str:
        return self.ctx.peer() or "serve-proxy"

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self.ctx.invocation_metadata() or ())


@serve.deployment(name="SpecsplitReplica")
@serve.ingress()
class SpecsplitReplica:
    """A target, its sessions and its scheduler, on one replica (see the module docstring).
    ``args``: ``ClusterSpec.replica_args()``."""

    async def __init__(self, args: dict) -> None:
        self.name = serve.get_replica_context().replica_id.unique_id
        factory = load_factory(args["server_factory"])
        prefix = f"{self.name}."  # session ids name their replica (router.owner_name)
        self.server = await asyncio.to_thread(
            factory, args["settings"], args.get("secrets") or {}, prefix
        )
        self.server.start()  # its gRPC port only (port 0: any free one)
        self.address = f"{advertised_host(args['host'])}:{self.server.port}"
        self.drain_timeout = float(args["drain_timeout"])
        self.gauges = ReplicaGauges(self.server.status, self.name)
        self.leaving = False
        log.info("replica %s pid %d sessions at %s", self.name, os.getpid(), self.address)

    def __serve_build_asgi_app__(self):  # noqa: ANN204 - the HTTP face (FastAPI)
        return self.server.http_app()

    # ---- through Serve's gRPC proxy ----

    def Handshake(self, request: pb.Hello, grpc_context) -> pb.Welcome:  # noqa: ANN001
        ctx = _ServeContext(grpc_context)
        service = self.server.service
        try:
            metadata = dict(ctx.invocation_metadata())
            key = service.keys.check(metadata.get("authorization", ""))
            if service.keys.required and key is None:
                ctx.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")
            joining = bool(metadata.get("session_id"))  # (takes no session slot)
            sch = self.server.scheduler
            if not joining and service.moving is None and len(sch.sessions) >= sch.max_sessions:
                ctx.abort(  # (the router chose the replica with the most room: none has any)
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{wire.FULL} every replica holds its maximum of {sch.max_sessions} sessions",
                )
            reply = service.Handshake(request, ctx)
        except Refused:
            return pb.Welcome()
        reply.session_address = self.address
        return reply

    def _elsewhere(self, grpc_context) -> None:  # noqa: ANN001
        """Refuse a streaming call through Serve's proxy (a status set on Serve's context
        reaches the client with an error raised, not with a stream that yields nothing)."""
        details = (
            "a Ray deployment serves sessions, Generate and Vocabulary at the address its "
            "handshake names (Welcome.session_address): handshake first"
        )
        grpc_context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        grpc_context.set_details(details)
        raise RuntimeError(details)  # (a plain exception: it crosses to the proxy pickled)

    async def Session(self, request_stream, grpc_context):  # noqa: ANN001, ANN201
        self._elsewhere(grpc_context)
        yield  # (a stream)

    def Generate(self, request: pb.GenerateRequest, grpc_context):  # noqa: ANN001, ANN201
        self._elsewhere(grpc_context)
        yield  # (a stream)

    def Vocabulary(self, request: pb.VocabularyRequest, grpc_context):  # noqa: ANN001, ANN201
        self._elsewhere(grpc_context)
        yield  # (a stream)

    # ---- Serve's hooks ----

    def record_routing_stats(self) -> dict:
        """For ``router.SessionRouter``: room for sessions, and whether this replica leaves."""
        sch = self.server.scheduler
        return {
            "t": time.time(),
            "sessions": len(sch.sessions),
            "max_sessions": sch.max_sessions,
            "draining": self.leaving,
            "address": self.address,
        }

    def record_autoscaling_stats(self) -> dict:
        """For ``autoscale.sessions_policy``."""
        return {"sessions": float(len(self.server.scheduler.sessions))}

    def check_health(self) -> None:
        if not self.server.scheduler.running:
            raise RuntimeError("the batch scheduler stopped")

    async def __del__(self) -> None:
        """Removed on purpose (Serve drained its HTTP requests first): move the sessions."""
        if self.leaving:
            return
        self.leaving = True
        await asyncio.to_thread(self._leave)

    def _leave(self) -> None:
        t0 = time.monotonic()
        left = self.server.drain(LEAVING, self.drain_timeout)
        log.info(
            "replica %s left: sessions moved in %.2f s, %d streams still open",
            self.name,
            time.monotonic() - t0,
            left,
        )
        self.gauges.stop()
        self.server.stop(grace=1.0)
