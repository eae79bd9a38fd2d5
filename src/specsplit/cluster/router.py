"""Where Serve sends a request (a handshake, an HTTP request): ``SessionRouter``.

A handshake carrying a session id (a drafter joining that session: metadata ``session_id``)
goes to the replica whose name begins the id (session ids are ``<replica>.<hex>``); the
replica refuses a session it does not hold anyway (NOT_FOUND). Anything else opens a session,
so it goes to the replica with the most free session slots: each replica's routing stats
(``sessions``, ``max_sessions``, taken every ``request_routing_stats_period_s``) minus what
this router placed there since (counted when it ranks a replica first, so that handshakes
arriving together spread out); a replica without stats yet (just started) counts as empty;
ties are broken at random; a draining replica comes last.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Mapping

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


def owner_name(session_id: str) -> str:
    """The replica name a session id begins with ("" for an id without one)."""
    name, dot, _ = session_id.partition(".")
    return name if dot else ""


def ranks(room: Mapping[Hashable, float], draining: set) -> list[list]:
    """Keys grouped by free room, most first; keys with no room, then draining ones, last.
    ``room``: key -> free session slots (may be <= 0)."""
    live = {k: r for k, r in room.items() if k not in draining}
    free = sorted({r for r in live.values() if r > 0}, reverse=True)
    out = [[k for k, r in live.items() if r == level] for level in free]
    full = [k for k, r in live.items() if r <= 0]
    return [g for g in (*out, full, [k for k in room if k in draining]) if g]


class SessionRouter(RequestRouter):
    """Joined drafters to their session's replica; new sessions to the most room."""

    def initialize_state(self, **kwargs: object) -> None:
        # replica -> (the routing stats' stamp, requests placed since those stats)
        self._placed: dict[ReplicaID, tuple[float | None, int]] = {}

    def _room(self, r: RunningReplica, cap: int) -> float:
        """Free session slots: the stats' (none yet: an empty replica of ``cap`` slots) less
        what this router placed there since they were taken."""
        st = r.routing_stats or {}
        stamp, placed = self._placed.get(r.replica_id, (None, 0))
        if stamp != st.get("t"):
            placed = 0  # fresh stats count them already
        return st.get("max_sessions", cap) - st.get("sessions", 0) - placed

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # (one ranking per try)
            owner = owner_name(pending_request.metadata.session_id)
            if owner:
                found = [r for r in candidate_replicas if r.replica_id.unique_id == owner]
                if found:
                    return [found]
        by_id = {r.replica_id: r for r in candidate_replicas}
        cap = max(
            ((r.routing_stats or {}).get("max_sessions", 1) for r in by_id.values()), default=1
        )
        room = {rid: self._room(r, cap) for rid, r in by_id.items()}
        draining = {rid for rid, r in by_id.items() if (r.routing_stats or {}).get("draining")}
        order = [rid for group in ranks(room, draining) for rid in random.sample(group, len(group))]
        if order:
            self._count(by_id[order[0]])  # (Serve takes the first rank unless it is busy)
        return [[by_id[rid]] for rid in order]

    def _count(self, r: RunningReplica) -> None:
        """One more session placed on r, until its next stats."""
        stamp = (r.routing_stats or {}).get("t")
        old, placed = self._placed.get(r.replica_id, (stamp, 0))
        self._placed[r.replica_id] = (stamp, placed + 1 if old == stamp else 1)
