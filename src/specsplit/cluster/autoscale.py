"""Serve's autoscaling on open sessions: ``sessions_policy``.

Sessions are not Serve requests (they stream straight to a replica), so Serve's default
policy, which counts ongoing requests, would see only handshakes. Each replica reports its
open sessions (``record_autoscaling_stats``: ``{"sessions": n}``, every 2 s); this policy asks
for total sessions / target per replica, the target being the autoscaling config's
``target_ongoing_requests`` read as open sessions per replica (``--target-sessions``). Serve
applies ``min_replicas``/``max_replicas`` and the up- and down-scaling delays.
"""

from __future__ import annotations

from ray.serve.config import AutoscalingContext

SESSIONS = "sessions"  # the metric each replica reports


def desired_replicas(sessions: dict, target: float, current: int) -> float:
    """Replicas for these sessions (replica -> open sessions, averaged over the look-back
    window); with no report yet, the current count."""
    if not sessions:
        return float(current)
    return sum(sessions.values()) / target


def sessions_policy(ctx: AutoscalingContext) -> tuple[float, dict]:
    """Serve's custom policy entry point: (desired replicas, policy state)."""
    per_replica = (ctx.aggregated_metrics or {}).get(SESSIONS, {})
    target = ctx.config.target_ongoing_requests or 1.0
    desired = desired_replicas(per_replica, target, ctx.target_num_replicas)
    return desired, {"sessions": float(sum(per_replica.values()))}
