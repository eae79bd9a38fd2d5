"""The verification service on Ray Serve: one local Ray instance for the module (2 CPUs, no
dashboard, a small object store), Serve's proxies on free loopback ports, two replicas of
SmolLM2-135M on torch with one thread each (``specsplit.cluster``, deployed as
`specsplit serve --ray` deploys it), and edge clients that know only the gRPC proxy's address.

Greedy text equals the target alone token for token (n-gram and draft-model drafters, six
clients at once, placed on both replicas); a joined drafter reaches its session's replica;
every replica full is "server full" at once; the key and the vocabulary are checked at the
handshake; the HTTP face runs through Serve and every replica's counters are in Ray's
metrics; a replica killed mid-generation costs its clients one reconnect and no token; a
scale-down tells the removed replica's sessions to move, and they finish on the other.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import grpc
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from conftest import free_port, ray_deployment  # noqa: E402
from specsplit.bench.cluster import pid_listening  # noqa: E402
from specsplit.engine.draft_length import FixedK  # noqa: E402
from specsplit.engine.speculative import (  # noqa: E402
    DecodeLoop,
    GenerationRequest,
    SpeculativeEngine,
)
from specsplit.errors import VerifierUnavailable  # noqa: E402
from specsplit.proposers.draft_model import DraftModelProposer  # noqa: E402
from specsplit.proposers.ngram import NGramProposer  # noqa: E402
from specsplit.transport import wire  # noqa: E402
from specsplit.transport.client import RemoteVerifier, join_and_draft  # noqa: E402
from specsplit.transport.pb import specsplit_pb2 as pb  # noqa: E402
from specsplit.transport.pb import specsplit_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
TOKEN = "ray-test-key-7f3a9c"
MAX_SESSIONS = 4  # per replica
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three facts about the Moon.",
    "Explain what a hash table is in two sentences.",
    "Name three primary colors.",
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
]
N_NEW = 32


class Cluster:
    """The module's deployment: its spec, the gRPC proxy's address, deploy again."""

    def __init__(self, spec) -> None:  # noqa: ANN001
        self.spec = spec
        self.address = f"127.0.0.1:{spec.grpc_port}"

    def deploy(self, **changes) -> None:  # noqa: ANN003
        from dataclasses import replace

        from specsplit.cluster import launch

        self.spec = replace(self.spec, **changes)
        launch.deploy(self.spec)

    def wait_replicas(self, n: int, timeout: float = 180.0) -> None:
        from specsplit.cluster.launch import running_replicas

        end = time.monotonic() + timeout
        while running_replicas(self.spec.app_name) != n:
            assert time.monotonic() < end, f"not {n} replicas after {timeout} s"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(smollm2_converted):
    from dataclasses import asdict

    from specsplit.cluster.spec import ClusterSpec
    from specsplit.faces.serve import _REPLICA, ServeSettings

    settings = ServeSettings(target=MODEL, threads=1, rate=0, max_sessions=MAX_SESSIONS)
    spec = ClusterSpec(
        server_factory="specsplit.faces.serve:replica_server",
        settings={k: v for k, v in asdict(settings).items() if k in _REPLICA},
        secrets={"auth_token": TOKEN},
        grpc_port=free_port(),
        http_port=free_port(),
        replicas=2,
        max_sessions=MAX_SESSIONS,
        drain_timeout=20.0,
    )
    with ray_deployment(spec):
        yield Cluster(spec)


@pytest.fixture(scope="module")
def target():
    from specsplit.backends.torch_backend import TorchBackend

    return TorchBackend.load(MODEL, threads=1)


@pytest.fixture(scope="module")
def prompts(target) -> list[list[int]]:
    tok = target.tokenizer
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special=False)
        for p in PROMPTS
    ]


@pytest.fixture(scope="module")
def reference(target, prompts) -> list[list[int]]:
    """The target alone (its plain greedy loop), per prompt."""
    engine = SpeculativeEngine(target)
    return [engine.generate(GenerationRequest(ids, N_NEW)).token_ids for ids in prompts]


def edge(cluster: Cluster, tokenizer, proposer=None, k: int = 4, **kw) -> DecodeLoop:  # noqa: ANN001, ANN003
    """An edge client knowing only the proxy's address (and the key)."""
    v = RemoteVerifier([cluster.address], tokenizer, auth_token=TOKEN, **kw)
    return DecodeLoop(v, [proposer or NGramProposer()], FixedK(k))


def replica_of(session_id: str) -> str:
    return session_id.partition(".")[0]


def run_clients(loops, prompts, on_progress=None) -> list:  # noqa: ANN001
    """Generate prompts[i] on loops[i] in threads; on_progress(tokens per client) after each
    chunk. The results (or the exception of a client)."""
    out: list = [None] * len(loops)
    seen = [0] * len(loops)

    def one(i: int) -> None:
        try:
            for chunk in loops[i].stream(GenerationRequest(prompts[i], N_NEW)):
                seen[i] += len(chunk.token_ids)
                if on_progress is not None:
                    on_progress(list(seen))
                if chunk.result is not None:
                    out[i] = chunk.result
        except Exception as e:  # noqa: BLE001 - returned to the test
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(loops))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


# ---- exactness and placement ----


def test_six_clients_equal_the_target_alone_and_land_on_both_replicas(
    cluster, target, prompts, reference
):
    loops = [edge(cluster, target.tokenizer) for _ in range(6)]  # (each one handshakes)
    results = run_clients(loops, prompts)
    placed = Counter(replica_of(loop.verifier.session_id) for loop in loops)
    assert len(placed) == 2 and min(placed.values()) >= 2, placed  # 3 + 3, or 4 + 2
    for res, ref, loop in zip(results, reference, loops, strict=True):
        assert not isinstance(res, Exception), res
        assert res.token_ids == ref
        assert res.stats.reconnects == 0
        addr = loop.verifier.link.session_address
        assert addr != cluster.address and addr.startswith("127.0.0.1:")  # a replica's own
        loop.verifier.shutdown()


def test_draft_model_drafter_equals_the_target_alone(cluster, target, prompts, reference):
    from specsplit.backends.llamacpp_backend import LlamaCppBackend

    draft = LlamaCppBackend.load(MODEL, n_ctx=1024, threads=1)
    proposer = DraftModelProposer(draft, quantize=True)
    loops = [edge(cluster, draft.tokenizer, proposer, k=3) for _ in range(2)]
    for i, loop in enumerate(loops):  # one after the other: one draft model
        res = loop.generate(GenerationRequest(prompts[i], N_NEW))
        assert res.token_ids == reference[i]
        assert res.stats.accepted > 0 and res.stats.reconnects == 0
        loop.verifier.shutdown()
    draft.close()


def test_sampled_drafts_replay_through_the_deployment(cluster, target, prompts):
    """A sampled request (the drafter's q crosses quantized) with a fixed K and a seed gives
    the same text twice, wherever it is placed; the drafts were verified, some accepted."""
    from specsplit.backends.llamacpp_backend import LlamaCppBackend
    from specsplit.sampling import SamplingParams

    draft = LlamaCppBackend.load(MODEL, n_ctx=1024, threads=1)
    params = SamplingParams(temperature=0.8, top_k=40)
    runs = []
    for _ in range(2):
        loop = edge(cluster, draft.tokenizer, DraftModelProposer(draft, quantize=True), k=3)
        runs.append(loop.generate(GenerationRequest(prompts[4], N_NEW, params, seed=11)))
        loop.verifier.shutdown()
    draft.close()
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].stats.proposed > 0 and runs[0].stats.accepted > 0


def test_the_vocabulary_comes_from_the_replica(cluster, target):
    """A client without a model takes the target's tokenizer: the Vocabulary call goes to
    the replica the handshake named (Serve's proxy refuses it, naming where to go)."""
    v = RemoteVerifier([cluster.address], target.tokenizer, auth_token=TOKEN)
    fp = v.link.welcome.tokenizer_fingerprint
    req = pb.VocabularyRequest(tokenizer_fingerprint=fp)
    blob = b"".join(c.data for c in v.link.stub.Vocabulary(req, metadata=v.link.metadata))
    assert blob[:2] == b"\x1f\x8b"  # a gzip stream (a vocabulary-only GGUF)
    with grpc.insecure_channel(cluster.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.VerifierStub(ch).Vocabulary(req, metadata=v.link.metadata))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "session_address" in e.value.details()
    v.shutdown()


def test_a_joined_drafter_reaches_its_sessions_replica(cluster, target, prompts, reference):
    """Four owners at once (two sessions per replica); a drafter joins each one knowing only
    the proxy's address and the session id: its handshake is routed to the owner's replica,
    where it drafts for rounds; the owners' text stays the target's. The replica that does
    not hold a session refuses a join of it (NOT_FOUND)."""
    owners = [edge(cluster, target.tokenizer, k=2) for _ in range(4)]
    joined: list[tuple[str, str, int]] = [("", "", 0)] * 4

    def join(i: int) -> None:
        v = owners[i].verifier
        while not v.session_id:
            time.sleep(0.01)
        n = join_and_draft(
            cluster.address,
            v.session_id,
            v.join_token,
            NGramProposer(),
            target.tokenizer,
            k=2,
            auth_token=TOKEN,
        )
        joined[i] = (v.session_id, v.join_token, n)

    joiners = [threading.Thread(target=join, args=(i,)) for i in range(4)]
    for t in joiners:
        t.start()
    results = run_clients(owners, prompts[:4])
    for t in joiners:
        t.join(60)
    for res, ref in zip(results, reference[:4], strict=True):
        assert not isinstance(res, Exception), res
        assert res.token_ids == ref
    addresses = {replica_of(o.verifier.session_id): o.verifier.link.session_address for o in owners}
    assert len(addresses) == 2
    for sid, _, rounds in joined:
        assert rounds > 0, f"the drafter joined to {sid} drafted for no round"
    sid, token, _ = joined[0]
    other = next(a for r, a in addresses.items() if r != replica_of(sid))
    assert _join_status(other, sid, token) == grpc.StatusCode.NOT_FOUND
    for o in owners:
        o.verifier.shutdown()


def _join_status(address: str, session_id: str, token: str) -> grpc.StatusCode:
    """The status a join of session_id gets at a replica's own address."""
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.VerifierStub(ch)
        msg = pb.ClientMsg(
            open=pb.Open(join_session_id=session_id, join_token=token, tokenizer_fingerprint="")
        )
        try:
            next(stub.Session(iter([msg]), metadata=[("authorization", f"Bearer {TOKEN}")]))
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_every_replica_full_is_refused_at_once(cluster, target, prompts):
    held = []
    for _ in range(2 * MAX_SESSIONS):
        v = RemoteVerifier([cluster.address], target.tokenizer, auth_token=TOKEN, retry_for=20)
        v.open(prompts[3], GenerationRequest(prompts[3], 1).params, 0)
        held.append(v)
    assert Counter(replica_of(v.session_id) for v in held).most_common()[0][1] == MAX_SESSIONS
    # the raw handshake: RESOURCE_EXHAUSTED "server full:" at once, not queued
    t0 = time.perf_counter()
    with grpc.insecure_channel(cluster.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.VerifierStub(ch).Handshake(
                pb.Hello(protocol_version=wire.PROTOCOL_VERSION),
                metadata=[("application", wire.APPLICATION), ("authorization", f"Bearer {TOKEN}")],
                timeout=10,
            )
    assert time.perf_counter() - t0 < 2.0
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details().startswith(wire.FULL)
    # the client: the same error as against one full server, naming it
    with pytest.raises(VerifierUnavailable, match="server full"):
        RemoteVerifier([cluster.address], target.tokenizer, auth_token=TOKEN, retry_for=0.5)
    for v in held:
        v.shutdown()


# ---- refusals at the handshake ----


def test_a_client_without_the_key_is_refused(cluster, target):
    from specsplit.errors import ConfigError

    with pytest.raises(ConfigError, match="UNAUTHENTICATED"):
        RemoteVerifier([cluster.address], target.tokenizer, retry_for=0.5)
    with pytest.raises(ConfigError, match="UNAUTHENTICATED"):
        RemoteVerifier([cluster.address], target.tokenizer, auth_token="wrong-key", retry_for=0.5)
    # and at a replica's own port (the session port checks the key too)
    v = RemoteVerifier([cluster.address], target.tokenizer, auth_token=TOKEN)
    with grpc.insecure_channel(v.link.session_address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            next(pb_grpc.VerifierStub(ch).Session(iter([pb.ClientMsg(open=pb.Open())])))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    v.shutdown()


def test_a_mismatched_tokenizer_is_refused_at_the_handshake(cluster):
    with grpc.insecure_channel(cluster.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.VerifierStub(ch).Handshake(
                pb.Hello(protocol_version=wire.PROTOCOL_VERSION, tokenizer_fingerprint="f" * 64),
                metadata=[("application", wire.APPLICATION), ("authorization", f"Bearer {TOKEN}")],
                timeout=10,
            )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tokenizer" in e.value.details()


# ---- the HTTP face and the metrics ----


def test_the_http_face_runs_through_serve(cluster, target, prompts, reference):
    url = f"http://127.0.0.1:{cluster.spec.http_port}"
    body = {"model": MODEL, "prompt": prompts[2], "max_tokens": N_NEW, "temperature": 0}
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        answer = json.load(r)
    assert answer["choices"][0]["text"] == target.tokenizer.decode(reference[2])
    assert answer["usage"]["completion_tokens"] == N_NEW
    with pytest.raises(urllib.error.HTTPError) as e:  # the key, on HTTP too
        urllib.request.urlopen(urllib.request.Request(url + "/v1/models"), timeout=30)
    assert e.value.code == 401


def _gauge(text: str, name: str) -> dict[str, float]:
    """replica -> value of a specsplit gauge in Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and 'replica="' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            out[replica] = float(line.rsplit(" ", 1)[1])
    return out


def test_every_replicas_counters_are_in_rays_metrics(cluster, target, prompts):
    from specsplit.cluster.launch import metrics_url

    loops = [edge(cluster, target.tokenizer) for _ in range(2)]
    for loop in loops:
        loop.verifier.open(prompts[0], GenerationRequest(prompts[0], 1).params, 0)
    names = {replica_of(loop.verifier.session_id) for loop in loops}
    assert len(names) == 2
    end = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(metrics_url(), timeout=10) as r:
            text = r.read().decode()
        sessions = _gauge(text, "ray_specsplit_sessions")
        if all(sessions.get(n, 0) >= 1 for n in names) or time.monotonic() > end:
            break
        time.sleep(2)
    for loop in loops:
        loop.verifier.shutdown()
    assert all(sessions.get(n, 0) >= 1 for n in names), sessions
    assert set(_gauge(text, "ray_specsplit_passes_total")) >= names


# ---- losing a replica ----


def test_a_killed_replica_costs_its_clients_one_reconnect_and_no_token(
    cluster, target, prompts, reference
):
    loops = [edge(cluster, target.tokenizer, k=2) for _ in range(4)]
    killed: dict = {}

    def kill_when_all_started(seen: list[int]) -> None:
        if killed or min(seen) < 4:
            return
        killed["session"] = loops[0].verifier.session_id
        port = int(loops[0].verifier.link.session_address.rsplit(":", 1)[1])
        killed["t"] = time.monotonic()
        os.kill(pid_listening(port), signal.SIGKILL)

    lock = threading.Lock()

    def guarded(seen: list[int]) -> None:
        with lock:
            kill_when_all_started(seen)

    results = run_clients(loops, prompts[:4], guarded)
    assert killed, "the replica was not killed"
    dead = replica_of(killed["session"])
    moved = 0
    for res, ref in zip(results, reference[:4], strict=True):
        assert not isinstance(res, Exception), res
        assert res.token_ids == ref  # no token lost, none repeated
    for loop, res in zip(loops, results, strict=True):
        was_there = res.stats.reconnects > 0
        moved += was_there
        assert res.stats.reconnects <= 1
        if was_there:
            assert replica_of(loop.verifier.session_id) != dead
        loop.verifier.shutdown()
    assert moved >= 1
    cluster.wait_replicas(2)  # Serve replaces it


def test_scale_down_moves_the_sessions_of_the_removed_replica(cluster, target, prompts, reference):
    cluster.wait_replicas(2)
    loops = [edge(cluster, target.tokenizer, k=2) for _ in range(4)]
    scaled: dict = {}

    def scale_when_all_started(seen: list[int]) -> None:
        if scaled or min(seen) < 4:
            return
        scaled["before"] = {replica_of(lp.verifier.session_id) for lp in loops}
        scaled["t"] = time.monotonic()
        threading.Thread(target=cluster.deploy, kwargs={"replicas": 1}).start()
        # every client waits here (on the lock) until one replica is stopping, so none can
        # finish its text on the removed replica before that replica tells it to move
        cluster.wait_replicas(1, timeout=60)

    lock = threading.Lock()

    def guarded(seen: list[int]) -> None:
        with lock:
            scale_when_all_started(seen)

    results = run_clients(loops, prompts[:4], guarded)
    assert scaled, "the deployment was not scaled"
    cluster.wait_replicas(1, timeout=60)
    took = time.monotonic() - scaled["t"]
    assert took < cluster.spec.drain_timeout  # the sessions moved; nobody waited them out
    survivors = {replica_of(lp.verifier.session_id) for lp in loops}
    assert len(survivors) == 1 and len(scaled["before"]) == 2
    for loop, res, ref in zip(loops, results, reference[:4], strict=True):
        assert not isinstance(res, Exception), res
        assert res.token_ids == ref
        assert res.stats.reconnects == loop.verifier.moved  # each resume: a "session moved"
        loop.verifier.shutdown()
    assert sum(loop.verifier.moved for loop in loops) >= 1
