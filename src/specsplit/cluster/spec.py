"""A specsplit deployment on Ray Serve, as data: ``ClusterSpec`` and the Serve config it
becomes (``serve_config``: what ``serve deploy`` takes, one application).

Replica counts and limits live in the config's deployment options, not in the application's
arguments, so deploying the same spec with another ``replicas`` is a light update (replicas
are added or removed; the others keep their sessions), while other settings redeploy.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specsplit.errors import ConfigError
from specsplit.transport import wire

DEPLOYMENT = "SpecsplitReplica"
SERVICER = "specsplit.transport.pb.specsplit_pb2_grpc.add_VerifierServicer_to_server"
ROUTER = "specsplit.cluster.router:SessionRouter"
POLICY = "specsplit.cluster.autoscale:sessions_policy"
BUILD = "specsplit.cluster.app:build"
SERVE_REQUESTS_ABOVE = 32  # Serve requests (handshakes, HTTP) past --max-sessions per replica
WAIT_LOOP_S = 0.5  # how often Serve checks a stopping replica's ongoing requests


@dataclass
class ClusterSpec:
    """Everything a deployment needs (``specsplit serve --ray`` builds it from its flags)."""

    server_factory: str  # "module:function"(settings, secrets, session_prefix) -> server
    settings: dict  # what every replica builds its server from (JSON values)
    secrets: dict = field(default_factory=dict)  # {"auth_token": str, "keys": keys file text}
    host: str = "127.0.0.1"  # Serve's HTTP proxy and every replica's session port bind here
    grpc_port: int = 50051  # Serve's gRPC proxy: the handshake (clients' --server)
    http_port: int = 8000  # Serve's HTTP proxy: the HTTP face
    replicas: int = 1  # fixed count (ignored with autoscale)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas
    target_sessions: float = 32.0  # open sessions per replica the autoscaler aims at
    max_sessions: int = 64  # per replica (the scheduler refuses past it: "server full")
    cpus_per_replica: float = 1.0  # Ray CPUs each replica reserves
    ray_address: str | None = None  # join this cluster; None: a local instance of our own
    drain_timeout: float = 30.0  # seconds a replica removed on purpose waits for sessions
    app_name: str = wire.APPLICATION
    routing_stats_period_s: float = 1.0  # how often routers learn each replica's sessions
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 10.0

    @classmethod
    def from_flags(
        cls,
        *,
        replicas: int | None,
        autoscale: str | None,
        target_sessions: int | None,
        max_sessions: int,
        threads: int | None,
        http_port: int | None,
        **kw: object,
    ) -> ClusterSpec:
        """From `specsplit serve` flags, with one-line errors for bad combinations."""
        if replicas is not None and autoscale:
            raise ConfigError("give either --replicas or --autoscale, not both")
        if replicas is not None and replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {replicas}")
        bounds = parse_autoscale(autoscale) if autoscale else None
        target = target_sessions if target_sessions is not None else max(1, max_sessions // 2)
        if not 0 < target <= max_sessions:
            raise ConfigError(f"--target-sessions must be in 1..--max-sessions, got {target}")
        return cls(
            replicas=replicas or 1,
            autoscale=bounds,
            target_sessions=float(target),
            max_sessions=max_sessions,
            cpus_per_replica=float(threads or 1),
            http_port=http_port if http_port is not None else 8000,
            **kw,  # type: ignore[arg-type]
        )

    def replica_args(self) -> dict:
        """The application's arguments: what each replica builds its server from."""
        return {
            "server_factory": self.server_factory,
            "settings": self.settings,
            "secrets": self.secrets,
            "host": self.host,
            "drain_timeout": self.drain_timeout,
        }

    def deployment_options(self) -> dict:
        """Serve's options for the replicas' deployment (a light update when only these
        change)."""
        opts: dict = {
            "name": DEPLOYMENT,
            # Serve requests are handshakes (short) and HTTP requests (each one a session of
            # the scheduler): the scheduler's "server full" answers before Serve's limits do
            "max_ongoing_requests": self.max_sessions + SERVE_REQUESTS_ABOVE,
            "max_queued_requests": self.max_sessions,
            "graceful_shutdown_wait_loop_s": WAIT_LOOP_S,
            # Serve drains HTTP requests, then the replica tells its sessions to move and
            # waits drain_timeout for them; Serve kills it after this
            "graceful_shutdown_timeout_s": self.drain_timeout + 15.0,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 30.0,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica},
            "request_router_config": {
                "request_router_class": ROUTER,
                "request_routing_stats_period_s": self.routing_stats_period_s,
                "request_routing_stats_timeout_s": 10.0,
            },
        }
        if self.autoscale is None:
            opts["num_replicas"] = self.replicas
        else:
            lo, hi = self.autoscale
            opts["autoscaling_config"] = {
                "min_replicas": lo,
                "max_replicas": hi,
                "target_ongoing_requests": self.target_sessions,  # read as sessions
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s,
                "policy": {"policy_function": POLICY},
            }
        return opts

    def runtime_env(self) -> dict:
        """Replicas import specsplit from where this process did (a source checkout too),
        with few malloc arenas and autoscaling reports every 2 s."""
        src = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        return {
            "env_vars": {
                "PYTHONPATH": path,
                "MALLOC_ARENA_MAX": "2",
                "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "2",
            }
        }

    def serve_config(self) -> dict:
        """The Serve config (``ServeDeploySchema``) of this deployment: one application."""
        return {
            "applications": [
                {
                    "name": self.app_name,
                    "route_prefix": "/",
                    "import_path": BUILD,
                    "args": self.replica_args(),
                    "runtime_env": self.runtime_env(),
                    "deployments": [self.deployment_options()],
                }
            ]
        }

    def as_dict(self) -> dict:
        """The spec without secrets (for logs and benchmark records)."""
        d = asdict(self)
        d["secrets"] = {k: "<set>" for k, v in self.secrets.items() if v}
        return d


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (MIN, MAX) with 1 <= MIN <= MAX."""
    lo, sep, hi = text.partition(":")
    try:
        bounds = (int(lo), int(hi))
    except ValueError:
        bounds = (0, -1)
    if not sep or not 1 <= bounds[0] <= bounds[1]:
        raise ConfigError(f"--autoscale must be MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return bounds
