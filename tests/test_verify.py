"""Verification math: hand-built cases and statistical checks of losslessness."""

import functools
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from conftest import ToyLM
from specsplit.randomness import Sequential
from specsplit.sampling import SamplingParams, logits_to_probs, sample
from specsplit.verify import (
    TokenTree,
    verify_chain,
    verify_greedy,
    verify_tree,
    verify_tree_greedy,
)


def test_greedy_accepts_matching_prefix_then_corrects():
    v = verify_greedy([5, 7, 9], [5, 7, 2, 4])
    assert (v.n_accepted, v.next_token) == (2, 2)


def test_greedy_all_accepted_gives_bonus():
    v = verify_greedy([5, 7], [5, 7, 3])
    assert (v.n_accepted, v.next_token) == (2, 3)


def test_greedy_empty_draft_is_plain_decoding():
    assert verify_greedy([], [11]).next_token == 11


def test_chain_rejects_token_target_cannot_produce():
    p = np.array([[0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    v = verify_chain([0], None, p, Sequential(0))
    assert (v.n_accepted, v.next_token) == (0, 1)


def test_chain_accepts_when_p_dominates_q():
    p = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    q = np.array([[0.5, 0.5, 0.0]])
    for seed in range(20):
        v = verify_chain([1], q, p, Sequential(seed))
        assert (v.n_accepted, v.next_token) == (1, 2)


def test_chain_correction_comes_from_residual():
    # p = (0.2, 0.8), q = (1, 0) one-hot on token 0: residual is all on token 1
    p = np.array([[0.2, 0.8], [0.5, 0.5]])
    outs = Counter()
    for seed in range(2000):
        v = verify_chain([0], None, p, Sequential(seed))
        outs[(v.n_accepted, v.next_token if v.n_accepted == 0 else -1)] += 1
    assert set(outs) == {(1, -1), (0, 1)}
    assert abs(outs[(1, -1)] / 2000 - 0.2) < 0.03


def test_token_tree_merges_common_prefixes():
    t = TokenTree.from_chains([[1, 2, 3], [1, 2, 4], [5]])
    assert t.tokens == (1, 2, 3, 4, 5)
    assert t.parents == (-1, 0, 1, 1, -1)
    assert t.node_of == ((0, 1, 2), (0, 1, 3), (4,))


def test_tree_greedy_follows_argmax_across_chains():
    chains = [[1, 2, 3], [1, 2, 4], [5]]
    t = TokenTree.from_chains(chains)
    # argmax rows: root->1, after node0 ->2, after node1 ->4, node2 ->0, node3 ->9, node4 ->0
    v = verify_tree_greedy(chains, t, [1, 2, 4, 0, 9, 0])
    assert (v.n_accepted, v.next_token, v.chain, v.path) == (3, 9, 1, (0, 1, 3))
    v = verify_tree_greedy(chains, t, [7, 2, 4, 0, 9, 0])
    assert (v.n_accepted, v.next_token, v.path) == (0, 7, ())


# ---- statistical checks: the emitted text has exactly the target's distribution ----

V = 6
N_TOKENS = 2  # compare the joint distribution of the first two generated tokens
N_SAMPLES = 12000


def _target_joint(target: ToyLM, params: SamplingParams) -> dict[tuple[int, ...], float]:
    out = {}
    p0 = logits_to_probs(target.logits(()), params)
    for a in range(V):
        p1 = logits_to_probs(target.logits((a,)), params)
        for b in range(V):
            out[(a, b)] = p0[a] * p1[b]
    return out


@functools.cache
def _probs(lm: ToyLM, prefix: tuple[int, ...], params: SamplingParams) -> np.ndarray:
    return logits_to_probs(lm.logits(prefix), params)


def _draft_chain(lm: ToyLM, prefix, k, params, rng, q_params=None):
    toks, q = [], []
    for _ in range(k):
        ctx = tuple(prefix) + tuple(toks)
        probs = _probs(lm, ctx, params)
        toks.append(sample(probs, rng.random()))
        q.append(probs if q_params is None else _probs(lm, ctx, q_params))
    return toks, np.array(q).reshape(k, V)


def _speculate(
    target,
    drafters,
    params,
    draft_params,
    k,
    rng,
    greedy_draft=False,
    q_params=None,
    n_tokens=N_TOKENS,
):
    """Run speculation rounds until n_tokens are out; return them. k: one draft length for
    every drafter, or one per drafter (chains of different lengths)."""
    ks = list(k) if isinstance(k, list | tuple) else [k] * len(drafters)
    out: list[int] = []
    while len(out) < n_tokens:
        chains, qs = [], []
        for d, kd in zip(drafters, ks, strict=True):
            if greedy_draft:
                toks, _ = _draft_chain(d, out, kd, SamplingParams(), rng)
                chains.append(toks)
                qs.append(None)
            else:
                toks, q = _draft_chain(d, out, kd, draft_params, rng, q_params)
                chains.append(toks)
                qs.append(q)
        tree = TokenTree.from_chains(chains)
        rows = [_probs(target, tuple(out), params)]
        for i in range(len(tree)):
            path, n = [], i
            while n != -1:
                path.append(tree.tokens[n])
                n = tree.parents[n]
            rows.append(_probs(target, tuple(out) + tuple(reversed(path)), params))
        p = np.array(rows)
        if len(drafters) == 1:
            v = verify_chain(chains[0], qs[0], p, Sequential(rng))
        else:
            v = verify_tree(chains, qs, tree, p, Sequential(rng))
        out += [tree.tokens[n] for n in v.path] + [v.next_token]
    return tuple(out[:n_tokens])


def _check(counts: Counter, joint: dict) -> None:
    keys = [k for k, pr in joint.items() if pr > 0]
    assert all(k in joint and joint[k] > 0 for k in counts), "emitted an impossible sequence"
    obs = np.array([counts[k] for k in keys], dtype=float)
    exp = np.array([joint[k] for k in keys]) * obs.sum()
    # pool cells with small expectations so the chi-square approximation holds
    small = exp < 5
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    assert chisquare(obs, exp).pvalue > 1e-3
    tv = 0.5 * np.abs(obs / obs.sum() - exp / exp.sum()).sum()
    assert tv < 0.03


SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
]


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: repr(p)[14:])
def test_single_chain_is_lossless(params):
    target, draft = ToyLM(V, 1), ToyLM(V, 2)
    rng = np.random.default_rng(3)
    counts = Counter(_speculate(target, [draft], params, params, 3, rng) for _ in range(N_SAMPLES))
    _check(counts, _target_joint(target, params))


@pytest.mark.parametrize("params", SETTINGS[:2] + SETTINGS[3:4], ids=lambda p: repr(p)[14:])
def test_two_drafters_are_lossless(params):
    target, d1, d2 = ToyLM(V, 1), ToyLM(V, 2), ToyLM(V, 5, sharpness=1.0)
    rng = np.random.default_rng(4)
    counts = Counter(_speculate(target, [d1, d2], params, params, 2, rng) for _ in range(N_SAMPLES))
    _check(counts, _target_joint(target, params))


def test_greedy_drafters_with_sampled_target_are_lossless():
    params = SamplingParams(temperature=1.0)
    target, d1, d2 = ToyLM(V, 1), ToyLM(V, 2), ToyLM(V, 7)
    rng = np.random.default_rng(5)
    counts = Counter(
        _speculate(target, [d1, d2], params, params, 2, rng, greedy_draft=True)
        for _ in range(N_SAMPLES)
    )
    _check(counts, _target_joint(target, params))


def test_q_from_other_settings_than_sampled_is_detected():
    """Guard on the test itself: sending a q other than the one sampled from must fail."""
    params = SamplingParams(temperature=1.0, top_k=2)
    target, draft = ToyLM(V, 1), ToyLM(V, 2)
    rng = np.random.default_rng(6)
    raw = SamplingParams(temperature=1.0)  # the classic bug: q from raw logits
    counts = Counter(
        _speculate(target, [draft], params, params, 3, rng, q_params=raw) for _ in range(N_SAMPLES)
    )
    with pytest.raises(AssertionError):
        _check(counts, _target_joint(target, params))


def test_q_sampled_from_untruncated_settings_is_still_exact():
    """A drafter may sample from any q, as long as it sends exactly that q."""
    params = SamplingParams(temperature=1.0, top_k=2)
    target, draft = ToyLM(V, 1), ToyLM(V, 2)
    rng = np.random.default_rng(7)
    wide = SamplingParams(temperature=1.3)
    counts = Counter(_speculate(target, [draft], params, wide, 3, rng) for _ in range(N_SAMPLES))
    _check(counts, _target_joint(target, params))


def _joint(target: ToyLM, params: SamplingParams, n: int) -> dict[tuple[int, ...], float]:
    """The target's exact joint distribution of its first n tokens."""
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, pr in out.items():
            p = logits_to_probs(target.logits(prefix), params)
            for t in np.flatnonzero(p):
                nxt[(*prefix, int(t))] = pr * p[t]
        out = nxt
    return out


def _check_marginals(samples: list[tuple[int, ...]], joint: dict, tv_max: float) -> None:
    """Each position's distribution, on its own, within tv_max of the target's."""
    n = len(samples)
    for i in range(len(next(iter(joint)))):
        exp = np.zeros(V)
        for seq, pr in joint.items():
            exp[seq[i]] += pr
        obs = np.bincount([s[i] for s in samples], minlength=V) / n
        assert 0.5 * np.abs(obs - exp).sum() < tv_max, f"position {i}"


@pytest.mark.parametrize("params", SETTINGS[:1] + SETTINGS[3:4], ids=lambda p: repr(p)[14:])
def test_three_drafters_with_chains_of_different_lengths_are_lossless(params):
    """Three and four children at a position, chains of 1, 2 and 3 tokens, four tokens deep."""
    target = ToyLM(V, 1)
    drafters = [ToyLM(V, 2), ToyLM(V, 5, sharpness=1.0), ToyLM(V, 9, sharpness=3.0), ToyLM(V, 2)]
    rng = np.random.default_rng(8)
    samples = [
        _speculate(target, drafters, params, params, [1, 2, 3, 2], rng, n_tokens=4)
        for _ in range(20000)
    ]
    joint = _joint(target, params, 4)
    _check(Counter(s[:3] for s in samples), _joint(target, params, 3))
    _check_marginals(samples, joint, tv_max=0.015)


def test_one_chain_is_lossless_past_the_first_tokens():
    """Six tokens deep (several rounds, rejections and bonus tokens), each position within a
    tight bound of the target's marginal and the first three jointly."""
    params = SamplingParams(temperature=1.0)
    target, draft = ToyLM(V, 1), ToyLM(V, 2)
    rng = np.random.default_rng(9)
    samples = [
        _speculate(target, [draft], params, params, 3, rng, n_tokens=6) for _ in range(20000)
    ]
    _check(Counter(s[:3] for s in samples), _joint(target, params, 3))
    _check_marginals(samples, _joint(target, params, 6), tv_max=0.015)
