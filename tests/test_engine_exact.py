"""Exactness of the engine on tiny float64 models: greedy equality and sampled distributions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from conftest import TinyTokenizer, perturbed, tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.engine.draft_length import AdaptiveK
from specsplit.engine.speculative import GenerationRequest, SpeculativeEngine
from specsplit.proposers.draft_model import DraftModelProposer
from specsplit.proposers.ngram import NGramProposer
from specsplit.sampling import SamplingParams, logits_to_probs


def make_backend(kind: str, model, tokenizer):
    if kind == "torch":
        from specsplit.backends.torch_backend import TorchBackend

        return TorchBackend(model, tokenizer)
    from specsplit.backends.numpy_backend import NumpyBackend

    return NumpyBackend.from_torch(model, tokenizer)


@pytest.fixture(scope="module")
def greedy_models():
    target = tiny_llama(vocab=300, seed=0)
    return target, perturbed(target, 0.08, seed=1), perturbed(target, 0.3, seed=2)


PROMPT = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 72, 101]


def _proposers(kind, drafter, models, tok):
    _, d1, d2 = models
    if drafter == "model":
        return [DraftModelProposer(make_backend(kind, d1, tok))]
    if drafter == "ngram":
        return [NGramProposer(max_ngram=3, min_ngram=1)]
    if drafter == "two-models":
        return [
            DraftModelProposer(make_backend(kind, d1, tok)),
            DraftModelProposer(make_backend(kind, d2, tok)),
        ]
    return [DraftModelProposer(make_backend(kind, d1, tok)), NGramProposer()]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("drafter", ["model", "ngram", "two-models", "model+ngram"])
@pytest.mark.parametrize("k", [1, 3, 6, None], ids=lambda k: f"k={k or 'auto'}")
def test_greedy_equals_target_greedy(kind, drafter, k, greedy_models):
    tok = ByteTokenizer(300)
    target = make_backend(kind, greedy_models[0], tok)
    req = GenerationRequest(PROMPT, max_new_tokens=64)
    reference = SpeculativeEngine(target).generate(req)
    assert reference.stats.target_passes == len(reference.token_ids) + (
        reference.finish_reason == "eos"
    )
    policy = None
    if k is None:  # auto K under a memory-bound cost profile (a GPU-like target)
        policy = AdaptiveK(k_max=8, learn_costs=False)
        policy.verify.add(1, 0.01)
        policy.verify.add(9, 0.012)
        policy.draft_per_token = 0.0005
    engine = SpeculativeEngine(
        target, _proposers(kind, drafter, greedy_models, tok), k=k, policy=policy
    )
    res = engine.generate(req)
    assert res.token_ids == reference.token_ids
    assert res.finish_reason == reference.finish_reason
    st = res.stats
    assert st.target_passes < reference.stats.target_passes  # speculation did something
    assert st.rejected_rounds >= 0.2 * st.target_passes, "rollback/correction not exercised"


def test_auto_k_can_choose_zero_and_stay_exact(greedy_models):
    tok = ByteTokenizer(300)
    target = make_backend("torch", greedy_models[0], tok)
    engine = SpeculativeEngine(
        target, [DraftModelProposer(make_backend("torch", greedy_models[2], tok))]
    )
    engine.policy.draft_per_token = 10.0  # drafting looks hopelessly slow
    engine.policy.verify.add(1, 0.01)
    req = GenerationRequest(PROMPT, max_new_tokens=30)
    res = engine.generate(req)
    assert res.token_ids == SpeculativeEngine(target).generate(req).token_ids
    assert res.stats.draft_lengths.count(0) >= 20


def test_rounds_record_the_k_asked_beside_the_k_delivered(greedy_models):
    """A draft model delivers the K asked; an n-gram table delivers fewer where its match is
    short or missing (the physical-limit line prices a fixed K by what it delivers)."""
    tok = ByteTokenizer(300)
    target = make_backend("torch", greedy_models[0], tok)
    req = GenerationRequest(PROMPT, max_new_tokens=40)
    model = SpeculativeEngine(
        target, [DraftModelProposer(make_backend("torch", greedy_models[2], tok))], k=3
    ).generate(req)
    st = model.stats
    assert len(st.draft_asked) == len(st.draft_lengths) == st.target_passes
    assert st.draft_asked == st.draft_lengths and st.draft_asked[1:].count(3) >= 5
    ngram = SpeculativeEngine(target, [NGramProposer(max_ngram=3, min_ngram=2)], k=6)
    st = ngram.generate(req).stats
    assert len(st.draft_asked) == len(st.draft_lengths) == st.target_passes
    assert all(k <= a for k, a in zip(st.draft_lengths, st.draft_asked, strict=True))
    rounds = list(zip(st.draft_lengths, st.draft_asked))[1:]  # (after the prefill's token)
    assert any(k < a for k, a in rounds), "the table always delivered: the test tests nothing"
    assert max(a for _, a in rounds) == 6 and any(k == 0 < a for k, a in rounds)


# ---- sampling: the first tokens are distributed exactly as the target's ----

V = 8
N = 2500
SAMPLED_PROMPT = [1, 5, 2, 7, 3]


@pytest.fixture(scope="module")
def small_vocab_models():
    target = tiny_llama(vocab=V, seed=3)
    return target, perturbed(target, 0.5, seed=4), perturbed(target, 1.0, seed=5)


def _exact_joint(target, params) -> dict[tuple[int, int], float]:
    seq = target.new_sequence()
    p0 = logits_to_probs(target.forward(seq, SAMPLED_PROMPT)[-1], params)
    out = {}
    for a in range(V):
        target.truncate(seq, len(SAMPLED_PROMPT))
        p1 = logits_to_probs(target.forward(seq, [a])[-1], params)
        for b in range(V):
            out[(a, b)] = p0[a] * p1[b]
    target.free_sequence(seq)
    return out


def _assert_matches(counts: Counter, joint: dict) -> None:
    assert all(joint.get(k, 0) > 0 for k in counts), "emitted a sequence the target cannot"
    keys = [k for k, pr in joint.items() if pr > 0]
    obs = np.array([counts[k] for k in keys], dtype=float)
    exp = np.array([joint[k] for k in keys]) * obs.sum()
    small = exp < 5  # pool rare outcomes so the chi-square approximation holds
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    assert chisquare(obs, exp).pvalue > 1e-3
    assert 0.5 * np.abs(obs - exp).sum() / obs.sum() < 0.08


SETTINGS = {
    "temperature": SamplingParams(temperature=0.9),
    "top-k": SamplingParams(temperature=1.0, top_k=3),
    "top-p": SamplingParams(temperature=1.0, top_p=0.7),
    "min-p": SamplingParams(temperature=1.0, min_p=0.15),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_tokens_follow_target_distribution(name, small_vocab_models):
    params = SETTINGS[name]
    # the exactness is the engine's arithmetic, not the backend's: the NumPy twin of the model
    # (3x faster per call) for all settings but one, so the default run stays short
    kind = "torch" if name == "temperature" else "numpy"
    tok = TinyTokenizer(V)
    target = make_backend(kind, small_vocab_models[0], tok)
    draft = DraftModelProposer(make_backend(kind, small_vocab_models[1], tok))
    engine = SpeculativeEngine(target, [draft], k=2)
    counts = Counter()
    accepted = 0
    for seed in range(N):
        res = engine.generate(GenerationRequest(SAMPLED_PROMPT, 3, params, seed=seed))
        counts[tuple(res.token_ids[:2])] += 1
        accepted += res.stats.accepted
    assert accepted > N * 0.3  # drafts were accepted, not just corrected
    _assert_matches(counts, _exact_joint(target, params))


def test_a_drafter_knows_what_catching_up_would_cost_it(greedy_models):
    tok = ByteTokenizer(300)
    draft = DraftModelProposer(make_backend("torch", greedy_models[1], tok))
    text = (PROMPT * 4)[:48]
    assert draft.catch_up_s(text) == 0.0  # nothing measured yet
    draft.prepare(text)  # one pass over 48 tokens: measured
    assert draft.prefill_per_token > 0 and draft.catch_up_s(text) == 0.0
    assert draft.catch_up_s(text + PROMPT) == pytest.approx(16 * draft.prefill_per_token)


def test_two_drafters_sampled_follow_target_distribution(small_vocab_models):
    params = SamplingParams(temperature=1.0, top_p=0.9)
    tok = TinyTokenizer(V)
    target = make_backend("numpy", small_vocab_models[0], tok)
    drafts = [
        DraftModelProposer(make_backend("numpy", small_vocab_models[1], tok)),
        DraftModelProposer(make_backend("numpy", small_vocab_models[2], tok)),
    ]
    engine = SpeculativeEngine(target, drafts, k=2)
    counts = Counter(
        tuple(engine.generate(GenerationRequest(SAMPLED_PROMPT, 3, params, seed=s)).token_ids[:2])
        for s in range(N)
    )
    _assert_matches(counts, _exact_joint(target, params))


def test_fixed_k_same_seed_replays(small_vocab_models):
    tok = TinyTokenizer(V)
    target = make_backend("numpy", small_vocab_models[0], tok)
    draft = DraftModelProposer(make_backend("numpy", small_vocab_models[1], tok))
    engine = SpeculativeEngine(target, [draft], k=3)
    params = SamplingParams(temperature=1.0)
    runs = [
        engine.generate(GenerationRequest(SAMPLED_PROMPT, 20, params, seed=s)).token_ids
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def _history_dependent(backend):
    """A backend whose logits depend a little on what its cache held before (as llama.cpp's
    do: a truncated sequence's new KV lands in cells after those an earlier request used,
    and the sums come out in other last digits); only an empty sequence starts afresh."""
    forward, truncate = backend.forward, backend.truncate
    fed = {}  # seq -> tokens fed since the sequence was last emptied

    def shaped(seq, tokens, parents=None):
        logits = forward(seq, tokens, parents)  # [n, V]
        fed[seq] = fed.get(seq, 0) + len(tokens)
        return logits + np.random.default_rng(fed[seq]).normal(0.0, 0.5, logits.shape[-1])

    def cut(seq, length):
        truncate(seq, length)
        if length == 0:
            fed[seq] = 0

    backend.forward, backend.truncate = shaped, cut
    return backend


def test_a_seeded_request_replays_whatever_the_drafter_cache_held(small_vocab_models):
    tok = TinyTokenizer(V)
    target = make_backend("numpy", small_vocab_models[0], tok)
    drafter = _history_dependent(make_backend("numpy", small_vocab_models[1], tok))
    engine = SpeculativeEngine(target, [DraftModelProposer(drafter)], k=3)
    params = SamplingParams(temperature=1.0)
    runs = [
        engine.generate(GenerationRequest(SAMPLED_PROMPT, 20, params, seed=s)).token_ids
        for s in (7, 7, 8, 7, 7)
    ]
    assert runs[0] == runs[1] == runs[3] == runs[4]


@pytest.mark.parametrize(
    "q_kind", ["top-3", "quantized", "quantized-top-4"], ids=lambda s: f"q={s}"
)
def test_truncated_and_quantized_q_keep_the_target_distribution(q_kind, small_vocab_models):
    """A drafter that samples from a truncated or quantized q (as the edge sends it) is exact
    when it sends exactly that q."""
    params = SamplingParams(temperature=1.0)
    tok = TinyTokenizer(V)
    kind = "torch" if q_kind == "quantized" else "numpy"
    target = make_backend(kind, small_vocab_models[0], tok)
    kw = {"top-3": {"top_m": 3}, "quantized": {"quantize": True, "top_m": 0}}.get(
        q_kind, {"quantize": True, "top_m": 4}
    )
    draft = DraftModelProposer(make_backend(kind, small_vocab_models[1], tok), **kw)
    engine = SpeculativeEngine(target, [draft], k=2)
    counts = Counter(
        tuple(engine.generate(GenerationRequest(SAMPLED_PROMPT, 3, params, seed=s)).token_ids[:2])
        for s in range(N)
    )
    _assert_matches(counts, _exact_joint(target, params))
