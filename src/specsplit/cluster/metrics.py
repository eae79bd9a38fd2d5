"""Every replica's counters in one place: Ray's metrics (``ReplicaGauges``).

Each replica sets these gauges every ``PERIOD`` seconds from its server's ``status()``, tagged
with the replica's name; Ray's metrics agent on each node serves them, with Ray's and Serve's
own, on the node's Prometheus endpoint (``http://NODE:METRICS_EXPORT_PORT/metrics``, printed
by ``specsplit serve --ray``) as ``ray_specsplit_<name>{replica="..."}``. Counters since the
replica started are exported as gauges (their current totals).
"""

from __future__ import annotations

import threading

from ray.util.metrics import Gauge

PERIOD = 2.0  # seconds between updates

# name -> (the status() key, description)
GAUGES = {
    "specsplit_sessions": ("sessions", "open sessions"),
    "specsplit_max_sessions": ("max_sessions", "most open sessions"),
    "specsplit_queue_rounds": ("queue_rounds", "rounds waiting for a target pass"),
    "specsplit_kv_bytes": ("kv_bytes", "bytes of KV cache held"),
    "specsplit_passes_total": ("passes", "batched verification passes"),
    "specsplit_rounds_total": ("rounds", "rounds verified"),
    "specsplit_batch_size_mean": ("batch_size_mean", "rounds per pass"),
    "specsplit_proposed_total": ("proposed", "draft tokens verified"),
    "specsplit_accepted_total": ("accepted", "draft tokens accepted"),
    "specsplit_acceptance_rate": ("acceptance_rate", "accepted / proposed"),
    "specsplit_evictions_total": ("evictions", "idle sessions evicted from the KV cache"),
    "specsplit_dropped_rounds_total": ("dropped_rounds", "rounds drafted ahead, dropped"),
    "specsplit_last_pass_seconds": ("last_pass_s", "seconds of the last pass"),
}


class ReplicaGauges:
    """Sets the gauges from ``status()`` every PERIOD seconds until ``stop``."""

    def __init__(self, status, replica: str) -> None:  # noqa: ANN001 - () -> dict
        self.status, self.tags = status, {"replica": replica}
        self.gauges = {
            name: Gauge(name, description=desc, tag_keys=("replica",))
            for name, (_, desc) in GAUGES.items()
        }
        self.batches = Gauge(
            "specsplit_batch_size_passes_total",
            description="passes by batch size",
            tag_keys=("replica", "size"),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="specsplit-gauges", daemon=True)
        self._thread.start()

    def update(self) -> None:
        st = self.status()
        for name, (key, _) in GAUGES.items():
            if st.get(key) is not None:
                self.gauges[name].set(float(st[key]), tags=self.tags)
        for size, passes in st.get("batch_sizes", {}).items():
            self.batches.set(float(passes), tags={**self.tags, "size": str(size)})

    def _run(self) -> None:
        while not self._stop.wait(PERIOD):
            self.update()

    def stop(self) -> None:
        self._stop.set()
