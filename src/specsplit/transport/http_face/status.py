"""``GET /status``: the server's state as JSON for the page's server panel.

Open sessions, rounds queued, KV bytes, batch sizes (passes per size), acceptance over all
sessions (edge clients included) and per drafter of the server's own (the requests this
face drafted for), evictions, refusals. The same counters as ``/metrics``; JSON because
parsing Prometheus text in the browser is awkward.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from specsplit.engine.metrics import GenerationStats
from specsplit.engine.scheduler import BatchScheduler
from specsplit.engine.speculative import Chunk
from specsplit.transport.http_face.metrics import WireCounters


@dataclass
class _Tally:
    requests: int = 0
    new_tokens: int = 0
    target_passes: int = 0
    proposed: int = 0
    accepted: int = 0


class DrafterTally:
    """Acceptance of the server's own drafter over the requests it finished, keyed by the
    drafter's name ("ngram", a model name, "none")."""

    def __init__(self, drafter: str) -> None:
        self.drafter = drafter
        self._tally = _Tally()
        self._lock = threading.Lock()

    def watch(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        """Pass chunks through and count the result's statistics; closing this generator
        closes the one it wraps at once (so its session is freed)."""
        try:
            for chunk in chunks:
                if chunk.result is not None:
                    self._add(chunk.result.stats)
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _add(self, s: GenerationStats) -> None:
        with self._lock:
            t = self._tally
            t.requests += 1
            t.new_tokens += s.new_tokens
            t.target_passes += s.target_passes
            t.proposed += s.proposed
            t.accepted += s.accepted

    def as_dict(self) -> dict:
        with self._lock:
            t = self._tally
            return {
                "drafter": self.drafter,
                "requests": t.requests,
                "proposed": t.proposed,
                "accepted": t.accepted,
                "acceptance_rate": t.accepted / t.proposed if t.proposed else None,
                "mean_accepted_length": t.new_tokens / t.target_passes if t.target_passes else None,
            }


def server_status(
    scheduler: BatchScheduler,
    target: str,
    wire: WireCounters | None = None,
    drafters: list[DrafterTally] | None = None,
) -> dict:
    """The panel's numbers, all read now."""
    sch, st = scheduler, scheduler.stats
    sessions = list(sch.sessions.values())
    return {
        "target": target,
        "sessions": len(sessions),
        "max_sessions": sch.max_sessions,
        "queue_rounds": sum(len(s.jobs) for s in sessions),
        "kv_bytes": sch.kv_bytes(),
        "kv_budget_bytes": sch.kv_budget,
        "max_batch": sch.max_batch,
        "passes": st.passes,
        "rounds": st.rounds,
        "batch_sizes": {str(k): v for k, v in sorted(st.batch_sizes.items())},
        "batch_size_mean": st.rounds / st.passes if st.passes else None,
        "last_pass_s": st.last_pass,
        "proposed": st.proposed,
        "accepted": st.accepted,
        "acceptance_rate": st.accepted / st.proposed if st.proposed else None,
        "drafters": [d.as_dict() for d in drafters or []],
        "evictions": st.evictions,
        "dropped_rounds": st.dropped,
        "refused": dict(wire.refused) if wire is not None else {},
    }
