"""What every client of a specsplit server shares: one channel after a successful handshake,
the order in which the servers of a list are tried, and gRPC failures as engine errors.

A server may place the client elsewhere: a Ray Serve deployment answers the handshake on
its proxy port and names the replica that will hold the session (``Welcome.session_address``);
sessions, Generate and Vocabulary calls then go there on a second channel. The client always
sends the Serve application's name as metadata (a plain server ignores it)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence

import grpc

from specsplit.errors import (
    ConfigError,
    Overloaded,
    ServerFull,
    SessionGone,
    SessionMoved,
    SpecsplitError,
    VerifierUnavailable,
)
from specsplit.transport import wire
from specsplit.transport.pb import specsplit_pb2 as pb
from specsplit.transport.pb import specsplit_pb2_grpc as pb_grpc

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
GRPC_FULL = "Concurrent RPC limit exceeded!"  # gRPC's own refusal (a server we do not run)
SERVE_FULL = "Request dropped due to backpressure"  # Ray Serve's: every replica busy, queue full


def error_of(e: grpc.RpcError) -> SpecsplitError:
    """A gRPC failure as an engine error: ServerFull and SessionGone mean another attempt
    (the next server, or the same one later) may succeed, SessionMoved that it should be made
    at once through the handshake address; the others are final."""
    code, details = e.code(), " ".join((e.details() or "").split())
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (
        details.startswith((wire.FULL, SERVE_FULL)) or details == GRPC_FULL
    ):
        return ServerFull(details)
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith(wire.MOVED):
        return SessionMoved(details)
    if code in RETRYABLE:
        return SessionGone(f"{code.name}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"server: {details}")
    return ConfigError(f"server refused ({code.name}): {details}")


def _channel(address: str, tls_ca: bytes | None) -> grpc.Channel:
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
        return grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


class Link:
    """A server after a successful handshake (``welcome``: its limits): ``stub`` calls the
    address that holds sessions (``session_address``: the handshake's own, or the replica a
    Ray deployment placed the client on). ``join_session``: the id of a session this client
    joins as a drafter, so that a Ray deployment places it on the session's replica."""

    def __init__(
        self,
        address: str,
        fingerprint: str,
        auth_token: str | None,
        tls_ca: bytes | None,
        expect_identity: str | None,
        timeout: float,
        join_session: str = "",
    ) -> None:
        self.address = address
        self.channel = _channel(address, tls_ca)
        self.metadata = [("application", wire.APPLICATION)]
        if auth_token:
            self.metadata.append(("authorization", f"Bearer {auth_token}"))
        placement = [("session_id", join_session)] if join_session else []  # (Serve's routing)
        hello = pb.Hello(
            protocol_version=wire.PROTOCOL_VERSION,
            tokenizer_fingerprint=fingerprint,
            target_identity=expect_identity or "",
        )
        self.bytes_out = hello.ByteSize() + wire.GRPC_FRAME
        try:
            t0 = time.perf_counter()
            self.welcome: pb.Welcome = pb_grpc.VerifierStub(self.channel).Handshake(
                hello, metadata=self.metadata + placement, timeout=timeout
            )
            self.rtt = time.perf_counter() - t0
        except grpc.RpcError as e:
            self.channel.close()
            raise error_of(e) from None
        self.bytes_in = self.welcome.ByteSize() + wire.GRPC_FRAME
        self.session_address = self.welcome.session_address or address
        self.session_channel = (
            self.channel
            if self.session_address == address
            else _channel(self.session_address, tls_ca)
        )
        self.stub = pb_grpc.VerifierStub(self.session_channel)

    def close(self) -> None:
        if self.session_channel is not self.channel:
            self.session_channel.close()
        self.channel.close()


def is_loopback(address: str) -> bool:
    """A HOST:PORT address on this machine (127.0.0.0/8, ::1 or localhost; names are not
    resolved)."""
    host = address.rpartition(":")[0].strip("[]") or address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Failover:
    """The servers in order of preference: the one in use, the next one when it fails (a
    failed one again only after all the others), and why each one tried has failed."""

    def __init__(self, servers: Sequence[str], retry_for: float) -> None:
        if not servers:
            raise ConfigError("give at least one server as HOST:PORT")
        self.servers = list(servers)
        self.retry_for = retry_for
        self.at = 0  # index of the server in use (or to try next)
        self.why: dict[str, str] = {}  # address -> why it failed, since the last success
        self._since: float | None = None  # when the failures since the last success began
        self._failures = 0
        self._delay = 0.1

    @property
    def address(self) -> str:
        return self.servers[self.at]

    def ok(self) -> None:
        """The server in use works: the next failure starts afresh."""
        self.why.clear()
        self._since, self._failures, self._delay = None, 0, 0.1

    def failed(self, why: str) -> None:
        """The server in use failed: move to the next. After each pass over the list wait a
        little (longer each time); once retry_for seconds have passed without a success,
        raise VerifierUnavailable naming every server tried and why it failed."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        self.why[self.address] = why
        self.at = (self.at + 1) % len(self.servers)
        self._failures += 1
        if self._failures % len(self.servers):
            return
        if now - self._since + self._delay > self.retry_for:
            raise VerifierUnavailable(f"no verification server answered ({self.summary()})")
        time.sleep(self._delay)
        self._delay = min(2 * self._delay, 1.0)

    def summary(self) -> str:
        return "; ".join(f"{address}: {why}" for address, why in self.why.items())


def check_target(link: Link, expected: str | None) -> None:
    """A server whose target is not the one the user named: a one-line error."""
    got = link.welcome.target_name
    if expected and got != expected:
        link.close()
        raise ConfigError(f"{link.address} serves {got}, not {expected} (drop --target to use it)")
