"""The server's counters as Prometheus metrics, read from the scheduler at scrape time.

``ServerCollector`` is a prometheus-client custom collector: nothing is counted twice, the
scheduler and the gRPC service keep their own counters and each scrape reads them. Register
it on a registry of the server's own (``server_registry``), not the global one, so that
several servers in one process do not clash. Names (``specsplit_`` prefix, ``_total`` on
counters): sessions, queue_rounds, kv_bytes, kv_budget_bytes, passes, rounds,
batch_size_passes{size}, batch_size_mean, dropped_rounds, draft_tokens, accepted_tokens,
acceptance_rate, emitted_tokens, prefill_tokens, prefill_passes, evictions, verify_seconds,
received_bytes, sent_bytes, refused{code}; per API key (``KeyCollector``): key_calls{key},
key_tokens{key}, key_token_quota{key}, key_refused{key,reason}.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from specsplit.engine.scheduler import BatchScheduler
from specsplit.transport.keys import Keys


class WireCounters(Protocol):
    """What the gRPC service counts (``transport.service.Counters``)."""

    bytes_in: int
    bytes_out: int
    refused: dict[str, int]


def _gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"specsplit_{name}", help_, value=value)


def _counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"specsplit_{name}", help_, value=value)


class ServerCollector(Collector):
    """Reads a scheduler's (and optionally the gRPC service's) counters on each scrape."""

    def __init__(self, scheduler: BatchScheduler, wire: WireCounters | None = None) -> None:
        self.scheduler, self.wire = scheduler, wire

    def collect(self) -> Iterator[Metric]:
        sch, st = self.scheduler, self.scheduler.stats
        sessions = list(sch.sessions.values())
        yield _gauge("sessions", "Open sessions.", len(sessions))
        queued = sum(len(s.jobs) for s in sessions)
        yield _gauge("queue_rounds", "Rounds waiting for a target pass.", queued)
        yield _gauge("kv_bytes", "Bytes of KV cache held.", sch.kv_bytes())
        yield _gauge("kv_budget_bytes", "KV budget (0: none).", sch.kv_budget or 0)
        yield _counter("passes", "Batched verification passes.", st.passes)
        yield _counter("rounds", "Rounds verified.", st.rounds)
        sizes = CounterMetricFamily(
            "specsplit_batch_size_passes", "Verification passes by batch size.", labels=["size"]
        )
        for size, n in sorted(st.batch_sizes.items()):
            sizes.add_metric([str(size)], n)
        yield sizes
        mean = st.rounds / st.passes if st.passes else 0.0
        yield _gauge("batch_size_mean", "Mean sessions per pass.", mean)
        yield _counter("dropped_rounds", "Pipelined rounds dropped.", st.dropped)
        yield _counter("draft_tokens", "Draft tokens verified.", st.proposed)
        yield _counter("accepted_tokens", "Draft tokens accepted.", st.accepted)
        rate = st.accepted / st.proposed if st.proposed else 0.0
        yield _gauge("acceptance_rate", "Accepted / proposed draft tokens.", rate)
        yield _counter("emitted_tokens", "Tokens committed by rounds.", st.emitted)
        yield _counter("prefill_tokens", "Prompt tokens prefilled.", st.prefill_tokens)
        yield _counter("prefill_passes", "Batched prefill passes.", st.prefill_passes)
        yield _counter("evictions", "Idle KV caches evicted.", st.evictions)
        yield _counter("verify_seconds", "Seconds in target passes.", st.t_verify)
        if self.wire is None:
            return
        yield _counter("received_bytes", "gRPC message bytes in.", self.wire.bytes_in)
        yield _counter("sent_bytes", "gRPC message bytes out.", self.wire.bytes_out)
        refused = CounterMetricFamily(
            "specsplit_refused", "RPCs refused, by status.", labels=["code"]
        )
        for code, n in sorted(self.wire.refused.items()):
            refused.add_metric([code], n)
        yield refused


class KeyCollector(Collector):
    """Usage per API key: calls admitted, tokens generated, calls refused by reason."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "specsplit_key_calls", "Calls admitted (rounds, requests), by key.", labels=["key"]
        )
        tokens = CounterMetricFamily(
            "specsplit_key_tokens", "Tokens generated, by key.", labels=["key"]
        )
        quota = GaugeMetricFamily(
            "specsplit_key_token_quota", "Token quota (absent: none), by key.", labels=["key"]
        )
        refused = CounterMetricFamily(
            "specsplit_key_refused", "Calls refused, by key and reason.", labels=["key", "reason"]
        )
        for p in self.keys.usage():
            calls.add_metric([p.name], p.calls)
            tokens.add_metric([p.name], p.tokens)
            if p.token_quota is not None:
                quota.add_metric([p.name], p.token_quota)
            for reason, n in sorted(p.refused.items()):
                refused.add_metric([p.name, reason], n)
        yield from (calls, tokens, quota, refused)


def server_registry(
    scheduler: BatchScheduler, wire: WireCounters | None = None, keys: Keys | None = None
) -> CollectorRegistry:
    """A registry of its own holding the server's collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(scheduler, wire))
    if keys is not None:
        registry.register(KeyCollector(keys))
    return registry
