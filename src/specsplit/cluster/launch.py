"""`specsplit serve --ray`: start (or join) Ray, start Serve's proxies, deploy, serve until
SIGINT/SIGTERM, then stop what this command started.

Without an address a local Ray instance is started (``ray.init(address="local")``) and shut
down at the end with every process it started. With one, the command joins that cluster, and
at the end deletes its application and leaves the cluster running. ``deploy`` applies a
``ClusterSpec`` as a Serve config, so deploying it again with another replica count scales
the running application without restarting the other replicas.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import ray
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.schema import ServeDeploySchema

from specsplit.cluster.spec import DEPLOYMENT, SERVICER, ClusterSpec
from specsplit.errors import ConfigError


def start_ray(spec: ClusterSpec) -> None:
    """Join the cluster at ``spec.ray_address``, or start a local instance of our own."""
    env = spec.runtime_env()  # (Serve's proxies, started from this job, import the same code)
    if spec.ray_address:
        ray.init(address=spec.ray_address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, runtime_env=env, log_to_driver=False)


def start_serve(spec: ClusterSpec) -> None:
    """Serve's proxies: HTTP on host:http_port, gRPC (the handshake) on grpc_port."""
    serve.start(
        http_options={"host": spec.host, "port": spec.http_port},
        grpc_options=gRPCOptions(port=spec.grpc_port, grpc_servicer_functions=[SERVICER]),
    )


def deploy(spec: ClusterSpec, timeout: float = 900.0) -> None:
    """Apply the spec's Serve config and wait until the application runs (a first deploy
    loads every replica's target: minutes for a large one)."""
    from ray.serve.context import _get_global_client  # (what `serve deploy` does, no dashboard)

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(spec.serve_config()))
    wait_running(spec.app_name, timeout)


def wait_running(app: str, timeout: float) -> None:
    """Until ``app`` runs with the replicas it wants; a one-line error if it failed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = serve.status().applications.get(app)
        if status is not None:
            if status.status == "RUNNING":
                return
            if status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise ConfigError(f"the Ray deployment failed: {_one_line(status.message)}")
        time.sleep(0.5)
    raise ConfigError(f"the Ray deployment did not start in {timeout:.0f} s")


def running_replicas(app: str) -> int:
    status = serve.status().applications.get(app)
    if status is None or DEPLOYMENT not in status.deployments:
        return 0
    return int(status.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0))


def metrics_url() -> str:
    """The head node's Prometheus endpoint (Ray's metrics agent: ours, Ray's, Serve's)."""
    head = next((n for n in ray.nodes() if n.get("Alive")), {})
    return (
        f"http://{head.get('NodeManagerAddress', '?')}:{head.get('MetricsExportPort', '?')}/metrics"
    )


def run(spec: ClusterSpec) -> int:
    """The command: deploy, serve until SIGINT or SIGTERM, stop (see the module docstring)."""
    start_ray(spec)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # (after ray.init, which installs its own)
        signal.signal(sig, lambda *_: stop.set())
    try:
        start_serve(spec)
        deploy(spec)
        print(
            f"specsplit serving {spec.settings.get('target')} on Ray Serve: gRPC "
            f"{spec.host}:{spec.grpc_port}, HTTP {spec.host}:{spec.http_port}, "
            f"{running_replicas(spec.app_name)} replicas; Ray {ray.get_runtime_context().gcs_address}; "
            f"metrics {metrics_url()}",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("shutting down (sessions are told to move first)", file=sys.stderr, flush=True)
    finally:
        if spec.ray_address:
            serve.delete(spec.app_name)  # our replicas; the cluster and Serve stay
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"
