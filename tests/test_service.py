"""The split system through a real gRPC server on loopback: exact tokens, distributions,
many sessions batched, drafters joining a session, cloud-only generation, the HTTP face."""

from __future__ import annotations

import copy
import json
import threading
import time
import urllib.request
from collections import Counter

import grpc
import numpy as np
import pytest
from scipy.stats import chisquare

from conftest import TinyTokenizer, perturbed, tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.torch_backend import TorchBackend
from specsplit.engine.draft_length import AdaptiveK, FixedK
from specsplit.engine.speculative import DecodeLoop, GenerationRequest, SpeculativeEngine
from specsplit.engine.verifier import LocalVerifier
from specsplit.proposers.draft_model import DraftModelProposer
from specsplit.proposers.ngram import NGramProposer
from specsplit.sampling import SamplingParams, logits_to_probs
from specsplit.transport.client import RemoteVerifier, generate_cloud, join_and_draft
from specsplit.transport.pb import specsplit_pb2 as pb
from specsplit.transport.server import ServerConfig, SpecsplitServer
from test_engine_exact import (
    PROMPT,
    SAMPLED_PROMPT,
    N,
    V,
    _assert_matches,
    _exact_joint,
)
from test_service_faults import in_thread, stream_and_stop, wait_for


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(vocab=300, seed=0)
    return target, perturbed(target, 0.08, seed=1), perturbed(target, 0.3, seed=2)


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer(300)


@pytest.fixture(scope="module")
def server(models, tok):
    srv = SpecsplitServer(
        TorchBackend(models[0], tok),
        "tiny",
        ServerConfig(port=0, http_port=0, rate=None, batch_window=0.02),
        make_proposers=lambda: [NGramProposer()],
    )
    srv.start()
    yield srv
    srv.stop(grace=0)


def _reference(models, tok, prompt=PROMPT, n=64):
    return SpeculativeEngine(TorchBackend(models[0], tok)).generate(GenerationRequest(prompt, n))


def _edge(server, tok, proposers, policy):
    verifier = RemoteVerifier([f"127.0.0.1:{server.port}"], tok)
    return DecodeLoop(verifier, proposers, policy, pipeline=True), verifier


@pytest.mark.parametrize(
    "drafter,policy",
    [("model", "k3"), ("model", "auto"), ("ngram", "k4"), ("two-models", "k2")],
)
def test_greedy_through_service_equals_target_greedy(drafter, policy, server, models, tok):
    ref = _reference(models, tok)
    d1 = DraftModelProposer(TorchBackend(models[1], tok))
    proposers = {
        "model": [d1],
        "ngram": [NGramProposer()],
        "two-models": [d1, DraftModelProposer(TorchBackend(models[2], tok))],
    }[drafter]
    pol = AdaptiveK(8) if policy == "auto" else FixedK(int(policy[1:]))
    loop, verifier = _edge(server, tok, proposers, pol)
    chunks = list(loop.stream(GenerationRequest(PROMPT, 64)))
    res = chunks[-1].result
    assert res.token_ids == ref.token_ids
    assert "".join(c.text for c in chunks) == res.text == ref.text
    st = res.stats
    # fewer passes than tokens where K is fixed (auto may rightly choose K = 0 on a tiny model
    # whose one-token pass is far cheaper than a longer one)
    assert st.target_passes < 64 if policy != "auto" else st.target_passes <= 64
    assert st.bytes_sent > 0 and st.bytes_received > 0 and st.round_trips >= st.target_passes
    again = loop.generate(GenerationRequest(PROMPT, 8)).stats  # bytes are per request
    assert 0 < again.bytes_sent < st.bytes_sent and 0 < again.bytes_received < st.bytes_received
    if drafter == "model" and policy == "k3":
        assert st.dropped > 0 and st.rejected_rounds > 0  # drafts ahead were made and dropped
    verifier.shutdown()


def test_pipelined_rounds_are_verified_when_the_round_before_passes(server, models, tok):
    # the draft model equals the target: every round passes, every round drafted ahead counts
    same = DraftModelProposer(TorchBackend(models[0], tok))
    loop, verifier = _edge(server, tok, [same], FixedK(4))
    before = server.scheduler.stats.dropped
    res = loop.generate(GenerationRequest(PROMPT, 60))
    verifier.shutdown()
    assert res.token_ids == _reference(models, tok, n=60).token_ids
    assert res.stats.acceptance_rate == 1.0
    assert res.stats.dropped == 0 and server.scheduler.stats.dropped == before
    assert res.stats.target_passes <= 60 // 5 + 1


def test_sampled_tokens_through_service_follow_target_distribution():
    params = SamplingParams(temperature=1.0, top_p=0.9)
    target_model = tiny_llama(vocab=V, seed=3)
    tok = TinyTokenizer(V)
    srv = SpecsplitServer(
        TorchBackend(target_model, tok), "tiny8", ServerConfig(port=0, rate=None, batch_window=0)
    )
    srv.start()
    try:
        draft = DraftModelProposer(
            TorchBackend(perturbed(target_model, 0.5, seed=4), tok), quantize=True
        )
        loop, verifier = _edge(srv, tok, [draft], FixedK(2))
        counts, accepted = Counter(), 0
        for seed in range(N):
            res = loop.generate(GenerationRequest(SAMPLED_PROMPT, 3, params, seed=seed))
            counts[tuple(res.token_ids[:2])] += 1
            accepted += res.stats.accepted
        verifier.shutdown()
    finally:
        srv.stop(grace=0)
    assert accepted > N * 0.3
    _assert_matches(counts, _exact_joint(TorchBackend(target_model, tok), params))


class CountingVerifier(RemoteVerifier):
    """A RemoteVerifier that counts the rounds drafted ahead it sent and those verified."""

    ahead = verified_ahead = 0

    def submit(self, drafts, version, pipelined=False):  # noqa: ANN001, ANN201
        fut = super().submit(drafts, version, pipelined)
        if pipelined:
            self.ahead += 1
            fut.add_done_callback(self._count)
        return fut

    def _count(self, fut) -> None:  # noqa: ANN001
        if fut.exception() is None and not fut.result().dropped:
            self.verified_ahead += 1


def _exact_joint_n(target, params, n: int) -> dict[tuple[int, ...], float]:
    """P(first n new tokens) under the target, by enumeration (vocabulary V)."""
    seq = target.new_sequence()
    base = len(SAMPLED_PROMPT)
    target.forward(seq, SAMPLED_PROMPT[:-1])
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], pr: float, last: int) -> None:
        target.truncate(seq, base - 1 + len(prefix))
        p = logits_to_probs(target.forward(seq, [last])[-1], params)
        if len(prefix) + 1 == n:
            for c in range(V):
                out[(*prefix, c)] = pr * p[c]
            return
        for c in np.flatnonzero(p):
            walk((*prefix, int(c)), pr * p[c], int(c))

    walk((), 1.0, SAMPLED_PROMPT[-1])
    target.free_sequence(seq)
    return out


def _marginal(joint: dict, keep: slice) -> dict:
    out: Counter = Counter()
    for k, pr in joint.items():
        out[k[keep]] += pr
    return dict(out)


AHEAD_N = 1500


def test_sampled_tokens_with_drafting_ahead_follow_target_distribution():
    """Rounds drafted ahead (pipelined) are really verified, and the text keeps the target's
    distribution: the first token comes from the prefill, then K = 1 and 5 new tokens, so the
    round drafted ahead of the first round decides the fourth token whenever that round passes
    whole and its bonus was guessed. Checked on (t1, t2), (t2, t3), (t3, t4), and on t4 given
    (t1, t2, t3) where that round was verified."""
    params = SamplingParams(temperature=0.7, top_p=0.9)
    target_model = tiny_llama(vocab=V, seed=3)
    tok = TinyTokenizer(V)
    srv = SpecsplitServer(
        TorchBackend(target_model, tok),
        "tiny8",
        ServerConfig(port=0, rate=None, batch_window=0, calibrate=False),
    )
    srv.start()
    try:
        draft = DraftModelProposer(
            TorchBackend(perturbed(target_model, 0.15, seed=4), tok), quantize=True
        )
        verifier = CountingVerifier([f"127.0.0.1:{srv.port}"], tok)
        runs: list[tuple[tuple[int, ...], bool]] = []  # first 4 tokens, ahead round verified
        for seed in range(AHEAD_N):
            loop = DecodeLoop(verifier, [draft], FixedK(1), pipeline=True)  # no pause carried over
            before = verifier.verified_ahead
            res = loop.generate(GenerationRequest(SAMPLED_PROMPT, 5, params, seed=seed))
            runs.append((tuple(res.token_ids[:4]), verifier.verified_ahead > before))
        verifier.shutdown()
    finally:
        srv.stop(grace=0)
    ahead = [t for t, verified in runs if verified]
    assert len(ahead) > AHEAD_N * 0.15, (verifier.ahead, len(ahead))
    joint = _exact_joint_n(TorchBackend(target_model, tok), params, 4)
    for keep in (slice(0, 2), slice(1, 3), slice(2, 4)):  # (t1, t2), (t2, t3), (t3, t4)
        _assert_matches(Counter(t[keep] for t, _ in runs), _marginal(joint, keep))
    # t4 where the round drafted ahead decided it: expected sum of p(t4 | t1, t2, t3)
    prefix = _marginal(joint, slice(0, 3))
    expected = np.zeros(V)
    for *head, _ in ahead:
        expected += [joint.get((*head, c), 0.0) / prefix[tuple(head)] for c in range(V)]
    observed = np.bincount([c for *_, c in ahead], minlength=V).astype(float)
    assert observed[expected == 0].sum() == 0, "a token the target cannot emit"
    observed, expected = observed[expected > 0], expected[expected > 0]
    small = expected < 5  # pooled, so the chi-square approximation holds
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    assert chisquare(observed, expected).pvalue > 1e-3


def test_fixed_k_seed_replays_across_the_network(models, tok):
    """Fixed K + seed: the same sampled text in one process, through a server without
    drafting ahead, with drafting ahead forced on, and across a failover to a second server."""
    params = SamplingParams(temperature=0.5)
    req = GenerationRequest(PROMPT, 64, params, seed=17)  # 3 rounds drafted ahead pass

    def drafter() -> DraftModelProposer:
        return DraftModelProposer(TorchBackend(models[1], tok), quantize=True)

    local = DecodeLoop(LocalVerifier(TorchBackend(models[0], tok)), [drafter()], FixedK(3))
    want = local.generate(req)
    servers = [
        SpecsplitServer(
            TorchBackend(copy.deepcopy(models[0]), tok),
            "tiny",
            ServerConfig(port=0, rate=None, calibrate=False),
        )
        for _ in range(2)
    ]
    for srv in servers:
        srv.start()
    a, b = (f"127.0.0.1:{srv.port}" for srv in servers)
    try:
        texts = {}
        for name, pipeline in (("no ahead", False), ("ahead", True)):
            v = CountingVerifier([a], tok)
            res = DecodeLoop(v, [drafter()], FixedK(3), pipeline=pipeline).generate(req)
            v.shutdown()
            texts[name] = (res.token_ids, res.text)
            assert (v.ahead > 0, v.verified_ahead > 0) == (pipeline, pipeline)
            assert res.stats.rejected_rounds > 0
        v = RemoteVerifier([a, b], tok, timeout=10, retry_for=10)
        loop = DecodeLoop(v, [drafter()], FixedK(3))
        chunks, err = in_thread(lambda: stream_and_stop(loop, req, lambda: servers[0].stop(0)))
        v.shutdown()
        assert err is None, repr(err)
        res = chunks[-1].result
        assert res.stats.reconnects >= 1
        assert "".join(c.text for c in chunks) == res.text
        texts["failover"] = (res.token_ids, res.text)
    finally:
        for srv in servers:
            srv.stop(grace=0)
    assert all(t == (want.token_ids, want.text) for t in texts.values()), texts


def test_fixed_k_above_the_servers_max_draft(server, models, tok):
    """K = 24 against a server with max_draft 16: the client keeps every round within the
    limit the handshake gave (drafting ahead too) instead of being refused."""
    same = DraftModelProposer(TorchBackend(models[0], tok))  # every draft passes: full rounds
    loop, verifier = _edge(server, tok, [same], FixedK(24))
    res = loop.generate(GenerationRequest(PROMPT, 64))
    verifier.shutdown()
    assert verifier.max_draft == server.scheduler.max_draft == 16
    assert res.token_ids == _reference(models, tok).token_ids
    assert max(res.stats.draft_lengths) == 16


def test_concurrent_sessions_get_their_own_text_and_are_batched(server, models, tok):
    prompts = [PROMPT[: 6 + 2 * i] for i in range(4)]
    refs = [_reference(models, tok, p, 40).token_ids for p in prompts]
    results: dict[int, list[int]] = {}
    drafts = [perturbed(models[0], 0.08, seed=10 + i) for i in range(4)]
    loops = [
        _edge(server, tok, [DraftModelProposer(TorchBackend(d, tok))], FixedK(1 + i))
        for i, d in enumerate(drafts)
    ]
    passes_before = dict(server.scheduler.stats.batch_sizes)

    def run(i: int) -> None:
        results[i] = loops[i][0].generate(GenerationRequest(prompts[i], 40)).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for _, v in loops:
        v.shutdown()
    assert [results.get(i) for i in range(4)] == refs
    after = server.scheduler.stats.batch_sizes
    batched = sum(n - passes_before.get(s, 0) for s, n in after.items() if s > 1)
    assert batched > 0  # some passes verified several sessions of different lengths and K
    assert 'specsplit_batch_size_passes_total{size="2"}' in server.metrics_text() or any(
        f'size="{s}"' in server.metrics_text() for s in (3, 4)
    )


def test_a_second_drafter_joins_the_session(server, models, tok):
    ref = _reference(models, tok, n=48)
    owner_loop, owner = _edge(
        server, tok, [DraftModelProposer(TorchBackend(models[2], tok))], FixedK(3)
    )
    stream = owner_loop.stream(GenerationRequest(PROMPT, 48))
    first = next(stream)  # the session is open now; another process joins with its own model
    rounds: list[int] = []
    joiner = threading.Thread(
        target=lambda: rounds.append(
            join_and_draft(
                f"127.0.0.1:{server.port}",
                owner.session_id,
                owner.join_token,
                DraftModelProposer(TorchBackend(models[1], tok)),
                tok,
                k=3,
            )
        )
    )
    joiner.start()
    time.sleep(0.5)
    rest = list(stream)
    owner.shutdown()
    joiner.join(timeout=30)
    ids = first.token_ids + [t for c in rest for t in c.token_ids]
    assert ids == ref.token_ids
    assert rounds and rounds[0] > 0  # the joined drafter's drafts were verified with the owner's


def test_owner_drafting_ahead_with_a_joined_drafter_finishes(server, models, tok):
    """With a drafter joined, the owner's rounds drafted ahead are answered "dropped"; the
    owner still makes progress and ends with the target's greedy text in bounded time."""
    ref = _reference(models, tok, n=48)
    same = DraftModelProposer(TorchBackend(models[0], tok))  # passes whole: always drafts ahead
    loop, owner = _edge(server, tok, [same], FixedK(3))
    stream = loop.stream(GenerationRequest(PROMPT, 48))
    first = next(stream)
    rounds: list[int] = []
    joiner = threading.Thread(
        target=lambda: rounds.append(
            join_and_draft(
                f"127.0.0.1:{server.port}",
                owner.session_id,
                owner.join_token,
                DraftModelProposer(TorchBackend(models[1], tok)),
                tok,
                k=2,
            )
        ),
        daemon=True,
    )
    joiner.start()
    hub = server.service.hubs[owner.session_id]
    wait_for(lambda: len(hub.members) == 2, what="the drafter to join")
    rest = in_thread(lambda: list(stream), timeout=60)
    owner.shutdown()
    joiner.join(timeout=30)
    assert first.token_ids + [t for c in rest for t in c.token_ids] == ref.token_ids
    assert rest[-1].result.stats.dropped > 0  # rounds drafted ahead were sent and dropped
    assert rounds and rounds[0] > 0


def test_joining_needs_the_join_token(server, models, tok):
    _, owner = _edge(server, tok, [], FixedK(0))
    owner.open(PROMPT, SamplingParams(), 1)
    with pytest.raises(grpc.RpcError) as e:
        join_and_draft_raw(server, owner.session_id, "wrong", tok)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    owner.shutdown()


def join_and_draft_raw(server, session_id, token, tok):
    v = RemoteVerifier([f"127.0.0.1:{server.port}"], tok)
    msg = pb.ClientMsg(
        open=pb.Open(
            join_session_id=session_id, join_token=token, tokenizer_fingerprint=tok.fingerprint()
        )
    )
    try:
        return next(v.link.stub.Session(iter([msg]), timeout=10))
    finally:
        v.shutdown()


def test_cloud_only_generate_equals_target(server, models, tok):
    ref = _reference(models, tok, n=32)
    chunks = list(
        generate_cloud(
            f"127.0.0.1:{server.port}", tok.fingerprint(), prompt_ids=PROMPT, max_new_tokens=32
        )
    )
    res = chunks[-1].result
    assert [t for c in chunks for t in c.token_ids] == res.token_ids == ref.token_ids
    assert "".join(c.text for c in chunks) == res.text == ref.text
    assert res.finish_reason == "length"
    assert res.stats.draft_lengths == [0] * 32  # the server alone: no speculation
    assert res.stats.bytes_sent > 0 and res.stats.bytes_received > 0
    drafted = list(
        generate_cloud(
            f"127.0.0.1:{server.port}",
            tok.fingerprint(),
            prompt_ids=PROMPT,
            max_new_tokens=32,
            server_draft=True,
        )
    )
    assert [t for c in drafted for t in c.token_ids] == ref.token_ids


def test_http_face_on_the_server_drafts_for_itself(server, models, tok):
    ref = _reference(models, tok, n=24)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 24, "temperature": 0}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http.port}/v1/completions",
        body,
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    assert out["choices"][0]["text"] == ref.text
    assert out["usage"]["completion_tokens"] == 24
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "specsplit_sessions" in text and "specsplit_acceptance_rate" in text


def test_tls_and_auth_token(models, tok, tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    srv = SpecsplitServer(
        TorchBackend(models[0], tok),
        "tiny",
        ServerConfig(
            port=0, tls_cert=cert.read_bytes(), tls_key=key.read_bytes(), auth_token="s3cret"
        ),
    )
    srv.start()
    try:
        address = [f"127.0.0.1:{srv.port}"]
        v = RemoteVerifier(address, tok, tls_ca_file=str(cert), auth_token="s3cret")
        loop = DecodeLoop(v, [NGramProposer()], FixedK(3))
        assert (
            loop.generate(GenerationRequest(PROMPT, 24)).token_ids
            == _reference(models, tok, n=24).token_ids
        )
        v.shutdown()
        with pytest.raises(Exception) as e:  # plaintext against a TLS port: no handshake
            RemoteVerifier(address, tok, auth_token="s3cret", retry_for=0.5)
        assert "no verification server answered" in str(e.value)
    finally:
        srv.stop(grace=0)
