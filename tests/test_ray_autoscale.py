"""Autoscaling on open sessions (`specsplit serve --ray --autoscale MIN:MAX`): one local Ray
instance for the module, SmolLM2-135M replicas on torch with one thread, a target of two
open sessions per replica and short delays. Sessions past the target add a replica, a new
session goes to the replica with room, and closing them removes it again."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from conftest import free_port, ray_deployment  # noqa: E402
from specsplit.sampling import SamplingParams  # noqa: E402
from specsplit.transport.client import RemoteVerifier  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def spec(smollm2_converted):
    from dataclasses import asdict

    from specsplit.cluster.spec import ClusterSpec
    from specsplit.faces.serve import _REPLICA, ServeSettings

    settings = ServeSettings(target=MODEL, threads=1, rate=0, max_sessions=8)
    spec = ClusterSpec(
        server_factory="specsplit.faces.serve:replica_server",
        settings={k: v for k, v in asdict(settings).items() if k in _REPLICA},
        grpc_port=free_port(),
        http_port=free_port(),
        autoscale=(1, 2),
        target_sessions=2.0,
        max_sessions=8,
        upscale_delay_s=0.0,
        downscale_delay_s=5.0,
        look_back_period_s=2.0,
    )
    with ray_deployment(spec):
        yield spec


def wait_for_replicas(spec, n: int, timeout: float) -> float:  # noqa: ANN001
    from specsplit.cluster.launch import running_replicas

    t0 = time.monotonic()
    while running_replicas(spec.app_name) != n:
        assert time.monotonic() - t0 < timeout, f"not {n} replicas after {timeout} s"
        time.sleep(0.5)
    return time.monotonic() - t0


def test_sessions_past_the_target_add_a_replica_and_closing_them_removes_it(spec):
    from specsplit.faces.api import load_tokenizer

    tok = load_tokenizer(MODEL)
    address = f"127.0.0.1:{spec.grpc_port}"
    ids = tok.encode("The three primary colors are")
    held = []
    for i in range(4):  # 4 sessions on the one replica: twice the target
        v = RemoteVerifier([address], tok)
        v.open(ids, SamplingParams(), i)
        held.append(v)
    first = {v.session_id.partition(".")[0] for v in held}
    assert len(first) == 1
    wait_for_replicas(spec, 2, timeout=120)
    time.sleep(2.0)  # (the routers learn the new replica's sessions)
    v = RemoteVerifier([address], tok)  # a new session: to the replica with room
    v.open(ids, SamplingParams(), 9)
    assert v.session_id.partition(".")[0] not in first
    held.append(v)
    for v in held:
        v.shutdown()
    wait_for_replicas(spec, 1, timeout=90)
