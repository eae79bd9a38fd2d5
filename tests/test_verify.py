"""Verification math: hand-built cases and statistical checks of losslessness."""

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


def _draft_chain(lm: ToyLM, prefix, k, params, rng, q_params=None):
    toks, q = [], []
    for _ in range(k):
        logits = lm.logits(tuple(prefix) + tuple(toks))
        probs = logits_to_probs(logits, params)
        toks.append(sample(probs, rng.random()))
        q.append(probs if q_params is None else logits_to_probs(logits, q_params))
    return toks, np.array(q).reshape(k, V)


def _speculate(target, drafters, params, draft_params, k, rng, greedy_draft=False, q_params=None):
    """Run speculation rounds until N_TOKENS are out; return them."""
    out: list[int] = []
    while len(out) < N_TOKENS:
        chains, qs = [], []
        for d in drafters:
            if greedy_draft:
                toks, _ = _draft_chain(d, out, k, SamplingParams(), rng)
                chains.append(toks)
                qs.append(None)
            else:
                toks, q = _draft_chain(d, out, k, draft_params, rng, q_params)
                chains.append(toks)
                qs.append(q)
        tree = TokenTree.from_chains(chains)
        rows = [target.logits(tuple(out))]
        for i in range(len(tree)):
            path, n = [], i
            while n != -1:
                path.append(tree.tokens[n])
                n = tree.parents[n]
            rows.append(target.logits(tuple(out) + tuple(reversed(path))))
        p = logits_to_probs(np.array(rows), params)
        if len(drafters) == 1:
            v = verify_chain(chains[0], qs[0], p, Sequential(rng))
        else:
            v = verify_tree(chains, qs, tree, p, Sequential(rng))
        out += [tree.tokens[n] for n in v.path] + [v.next_token]
    return tuple(out[:N_TOKENS])


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
