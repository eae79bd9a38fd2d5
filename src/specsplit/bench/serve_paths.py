"""The measurements behind the cluster's design: a session through Ray Serve's gRPC proxy (one
bidirectional stream = one Serve request, design A) or straight to a replica's own port with
Serve only for placement (design B, what ``specsplit.cluster`` does).

    python -m specsplit.bench.serve_paths --out benchmarks/ray_design

Both with an echo deployment (no model: a round is answered at once), so only the path is
measured:

- ``rounds``: ms per round (a 4-token draft, its verdict) through Serve's proxy, straight to
  the replica's port (a grpcio server inside the replica actor), and to a plain grpcio server
  in its own process; interleaved, median and p99 over 300 rounds x 3.
- ``drain``: two replicas, four open sessions each way, then a scale-down to one replica (a
  light update): when Serve calls the removed replica's ``__del__``, and how and when each
  session on it ends.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from specsplit.transport import wire
from specsplit.transport.pb import specsplit_pb2 as pb
from specsplit.transport.pb import specsplit_pb2_grpc as pb_grpc

APP = "echo"


def _verdict(msg: pb.ClientMsg) -> pb.ServerMsg:
    if msg.WhichOneof("msg") == "open":
        return pb.ServerMsg(opened=pb.Opened(session_id=str(os.getpid())))
    n = len(msg.draft.chains[0].tokens)
    return pb.ServerMsg(verdict=pb.Verdict(version=msg.draft.version + 1, n_accepted=n))


def _event(log: str, what: str) -> None:
    with open(log, "a") as f:
        f.write(json.dumps({"t": time.time(), "pid": os.getpid(), "what": what}) + "\n")


class _DirectEcho(pb_grpc.VerifierServicer):
    """Sessions on the replica's own port; when the replica leaves: "session moved"."""

    def __init__(self, leaving: threading.Event) -> None:
        self.leaving = leaving

    def Session(self, requests, context):  # noqa: ANN001, ANN201
        for msg in requests:
            if self.leaving.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{wire.MOVED} leaving")
            yield _verdict(msg)


def echo_deployment():  # noqa: ANN201 - a Serve deployment class (ray imported lazily)
    from ray import serve

    @serve.deployment(
        name="Echo",
        max_ongoing_requests=64,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=20.0,
    )
    class Echo:
        """A Handshake naming the replica's own port, a Session through Serve's proxy, and the
        same Session on the own port."""

        def __init__(self, log: str) -> None:
            self.log, self.leaving = log, threading.Event()
            self.server = grpc.server(futures.ThreadPoolExecutor(32))
            pb_grpc.add_VerifierServicer_to_server(_DirectEcho(self.leaving), self.server)
            self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
            self.server.start()

        def Handshake(self, request: pb.Hello) -> pb.Welcome:
            return pb.Welcome(session_address=self.address, target_name=str(os.getpid()))

        async def Session(self, stream):  # noqa: ANN001, ANN201
            async for msg in stream:
                yield _verdict(msg)

        def __del__(self) -> None:
            _event(self.log, "__del__")
            self.leaving.set()
            time.sleep(1.0)  # (the direct sessions hear "moved" at their next round)
            self.server.stop(0)

    return Echo


def echo_app(args: dict):  # noqa: ANN201 - the Serve config's import path
    return echo_deployment().bind(args["log"])


def _plain_server(port) -> None:  # noqa: ANN001 - a multiprocessing.Value("i")
    server = grpc.server(futures.ThreadPoolExecutor(8))
    pb_grpc.add_VerifierServicer_to_server(_DirectEcho(threading.Event()), server)
    port.value = server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.wait_for_termination()


class _Stream:
    """One session stream: send a round, wait for its verdict."""

    def __init__(self, address: str, metadata: list) -> None:  # noqa: ANN001
        self.channel = grpc.insecure_channel(address)
        self.q: queue.Queue = queue.Queue()
        self.q.put(pb.ClientMsg(open=pb.Open(prompt_ids=[1, 2, 3])))
        self.call = pb_grpc.VerifierStub(self.channel).Session(self._gen(), metadata=metadata)
        self.replica = next(self.call).opened.session_id  # the pid answering
        self.version = 0

    def _gen(self):  # noqa: ANN202
        while (m := self.q.get()) is not None:
            yield m

    def round(self) -> None:
        chain = pb.Chain(tokens=[5, 6, 7, 8])
        self.q.put(pb.ClientMsg(draft=pb.Draft(version=self.version, chains=[chain])))
        next(self.call)
        self.version += 1

    def close(self) -> None:
        self.q.put(None)
        self.call.cancel()
        self.channel.close()


def _times(stream: _Stream, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        stream.round()
        out.append(time.perf_counter() - t0)
    return out[20:]  # (warm-up)


def _deploy(replicas: int, log: str) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "specsplit.bench.serve_paths:echo_app",
                "args": {"log": log},
                "deployments": [{"name": "Echo", "num_replicas": replicas}],
            }
        ]
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    from specsplit.cluster.launch import wait_running

    wait_running(APP, 120)
    from ray import serve

    while True:  # (until the replica count is the one asked for)
        st = serve.status().applications[APP].deployments["Echo"].replica_states
        if st.get("RUNNING", 0) == replicas and sum(st.values()) == replicas:
            return
        time.sleep(0.2)


def cmd_rounds(proxy: str, reps: int, n: int) -> dict:
    md = [("application", APP)]
    welcome = pb_grpc.VerifierStub(grpc.insecure_channel(proxy)).Handshake(pb.Hello(), metadata=md)
    port = multiprocessing.Value("i", 0)
    plain = multiprocessing.Process(target=_plain_server, args=(port,), daemon=True)
    plain.start()
    while not port.value:
        time.sleep(0.05)
    paths = {
        "serve_proxy": (proxy, md),  # design A
        "replica_port": (welcome.session_address, []),  # design B
        "plain_grpcio": (f"127.0.0.1:{port.value}", []),
    }
    got: dict[str, list[float]] = {k: [] for k in paths}
    for rep in range(reps):
        order = list(paths) if rep % 2 == 0 else list(reversed(paths))
        for name in order:
            s = _Stream(*paths[name])
            got[name] += _times(s, n)
            s.close()
    plain.terminate()
    return {
        name: {
            "median_ms": statistics.median(ts) * 1e3,
            "p99_ms": statistics.quantiles(ts, n=100)[98] * 1e3,
            "rounds": len(ts),
        }
        for name, ts in got.items()
    }


def cmd_drain(proxy: str, log: str, through_proxy: bool) -> dict:
    """Two replicas, four sessions, scale to one: what the removed replica's sessions see."""
    _deploy(2, log)
    md = [("application", APP)]
    streams = []
    stub = pb_grpc.VerifierStub(grpc.insecure_channel(proxy))
    while len({s.replica for s in streams}) < 2 or len(streams) < 4:  # on both replicas
        if through_proxy:
            streams.append(_Stream(proxy, md))
        else:
            streams.append(_Stream(stub.Handshake(pb.Hello(), metadata=md).session_address, []))
    ended: list[dict] = []

    def keep_going(s: _Stream) -> None:
        try:
            while True:
                s.round()
                time.sleep(0.05)
        except grpc.RpcError as e:
            ended.append(
                {"replica": s.replica, "t": time.time(), "code": e.code().name,
                 "details": " ".join((e.details() or "").split())[:100]}
            )  # fmt: skip

    for s in streams:
        threading.Thread(target=keep_going, args=(s,), daemon=True).start()
    time.sleep(1.0)
    Path(log).write_text("")
    t0 = time.time()
    _deploy(1, log)
    t_done = time.time() - t0
    time.sleep(2.0)
    events = [json.loads(line) for line in Path(log).read_text().splitlines() if line]
    for s in streams:
        s.close()
    return {
        "sessions": "through Serve's proxy (A)" if through_proxy else "on the replica's port (B)",
        "scale_down_s": t_done,
        "__del__": [{"pid": e["pid"], "after_s": e["t"] - t0} for e in events],
        "sessions_ended": [
            {**{k: v for k, v in e.items() if k != "t"}, "after_s": e["t"] - t0} for e in ended
        ],
    }


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from specsplit.bench.split import free_port
    from specsplit.cluster.spec import SERVICER, ClusterSpec

    ap = argparse.ArgumentParser(prog="serve_paths", description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--out", default="bench_runs/ray_design")
    ns = ap.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    env = ClusterSpec(server_factory="", settings={}).runtime_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=env)
    gport = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": free_port()},
        grpc_options=gRPCOptions(port=gport, grpc_servicer_functions=[SERVICER]),
    )
    proxy, log = f"127.0.0.1:{gport}", str(out / "events.jsonl")
    try:
        _deploy(1, log)
        doc = {
            "load_before": os.getloadavg(),
            "rounds": cmd_rounds(proxy, ns.reps, ns.rounds),
            "drain": [cmd_drain(proxy, log, True), cmd_drain(proxy, log, False)],
            "load_after": os.getloadavg(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
