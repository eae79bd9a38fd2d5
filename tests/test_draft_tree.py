"""Token trees from one drafter: the draw-tree rule by hand, in distribution, and end to end."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from conftest import TinyTokenizer, perturbed, tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.draw_tree import DrawTree, verify_draw_tree, verify_draw_tree_greedy
from specsplit.engine.speculative import GenerationRequest, SpeculativeEngine
from specsplit.engine.tree_policy import AdaptiveTree, FixedTree, parse_tree
from specsplit.errors import ConfigError
from specsplit.proposers.draft_model import DraftModelProposer
from specsplit.proposers.draft_tree import TreeShape
from specsplit.randomness import Sequential, drafter_uniform
from specsplit.sampling import SamplingParams, logits_to_probs, sample
from specsplit.verify import TokenTree, verify_tree
from test_engine_exact import _assert_matches

# ---- the rule by hand ----


def test_draw_tree_merges_repeats_and_lists_the_draws_at_each_node():
    # draws: a, a (a repeat), b at the root; c under the first a, d under the repeat
    t = DrawTree.build([5, 5, 6, 7, 8], [-1, -1, -1, 0, 1])
    assert t.tree.tokens == (5, 6, 7, 8)
    assert t.tree.parents == (-1, -1, 0, 0)
    assert t.node == (0, 0, 1, 2, 3)
    assert t.kids[0] == (0, 1, 2)  # the root: all three draws, in draw order
    assert t.kids[1] == (3, 4)  # node "5": the children of both copies
    assert t.depth() == 2 and t.n_paths() == 3
    with pytest.raises(ConfigError):
        DrawTree.build([1, 2], [-1, 1])


def test_greedy_follows_the_target_argmax_down_the_tree():
    t = DrawTree.build([5, 6, 7, 8], [-1, -1, 1, 1])  # root: 5, 6; under 6: 7, 8
    # argmax after root = 6 (node 1), after node 1 = 8 (node 3), after node 3 = 2
    argmax = [6, 0, 8, 0, 2]
    v = verify_draw_tree_greedy(t, argmax)
    assert (v.n_accepted, v.next_token, v.path) == (2, 2, (1, 3))
    v = verify_draw_tree_greedy(t, [4, 0, 0, 0, 0])
    assert (v.n_accepted, v.next_token, v.path) == (0, 4, ())


# ---- the rule in distribution: two levels of i.i.d. draws on hand-built p and q ----

V4 = 4


def _dists(rng):
    p0 = rng.dirichlet(np.ones(V4))  # [V] the target after the committed text
    p1 = rng.dirichlet(np.ones(V4), size=V4)  # [V, V] the target after token a
    q0 = rng.dirichlet(np.ones(V4) * 0.7)  # the drafter's
    q1 = rng.dirichlet(np.ones(V4) * 0.7, size=V4)
    return p0, p1, q0, q1


def _draw(q0, q1, rng):
    """Three i.i.d. draws at the root; the first gets two children, the others one, a repeat
    of an earlier sibling none (counts never depend on the children's own values)."""
    tokens = [sample(q0, rng.random()) for _ in range(3)]
    parents, qrows = [-1, -1, -1], [q0, q0, q0]
    for j in range(3):
        if tokens[j] in tokens[:j]:
            continue
        for _ in range(2 if j == 0 else 1):
            x = tokens[j]
            tokens.append(sample(q1[x], rng.random()))
            parents.append(j)
            qrows.append(q1[x])
    return tokens, parents, np.stack(qrows)


def _two_tokens(verdict_tokens, p1, rng):
    """The first two tokens emitted (a plain decoding step if the round gave one)."""
    out = list(verdict_tokens)
    if len(out) < 2:
        out.append(sample(p1[out[0]], rng.random()))
    return tuple(out[:2])


def _check(counts, p0, p1, n):
    exp = np.array([p0[a] * p1[a, b] for a in range(V4) for b in range(V4)]) * n
    obs = np.array([counts[(a, b)] for a in range(V4) for b in range(V4)], dtype=float)
    return chisquare(obs, exp).pvalue, 0.5 * np.abs(obs - exp).sum() / n


N_MATH = 20000


def test_draw_tree_sampling_is_exact():
    rng = np.random.default_rng(0)
    p0, p1, q0, q1 = _dists(rng)
    counts: Counter = Counter()
    for _ in range(N_MATH):
        tokens, parents, q = _draw(q0, q1, rng)
        t = DrawTree.build(tokens, parents)
        p = np.stack([p0, *(p1[x] for x in t.tree.tokens)])  # [m + 1, V]
        v = verify_draw_tree(t, q, p, Sequential(rng))
        emitted = [t.tree.tokens[i] for i in v.path] + [v.next_token]
        counts[_two_tokens(emitted, p1, rng)] += 1
    pvalue, tv = _check(counts, p0, p1, N_MATH)
    assert pvalue > 1e-3 and tv < 0.02


def test_root_to_leaf_chains_through_verify_tree_are_not_exact():
    """The same tree written as root-to-leaf chains (shared prefixes repeated) makes the
    multi-draft rule try a shared draw once per chain: the check above catches it."""
    rng = np.random.default_rng(0)
    p0, p1, q0, q1 = _dists(rng)
    counts: Counter = Counter()
    for _ in range(N_MATH):
        tokens, parents, q = _draw(q0, q1, rng)
        leaves = [i for i in range(len(tokens)) if i not in parents]
        chains, qs = [], []
        for leaf in leaves:
            path = [leaf]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            path.reverse()
            chains.append([tokens[i] for i in path])
            qs.append(q[path])
        tree = TokenTree.from_chains(chains)
        p = np.stack([p0, *(p1[x] for x in tree.tokens)])
        v = verify_tree(chains, qs, tree, p, Sequential(rng))
        emitted = [tree.tokens[i] for i in v.path] + [v.next_token]
        counts[_two_tokens(emitted, p1, rng)] += 1
    pvalue, tv = _check(counts, p0, p1, N_MATH)
    assert pvalue < 1e-6


# ---- the drafter ----


@pytest.fixture(scope="module")
def greedy_models():
    target = tiny_llama(vocab=300, seed=0)
    return target, perturbed(target, 0.08, seed=1), perturbed(target, 0.3, seed=2)


PROMPT = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 72, 101]


def _backend(kind, model, tok):
    if kind == "torch":
        from specsplit.backends.torch_backend import TorchBackend

        return TorchBackend(model, tok)
    from specsplit.backends.numpy_backend import NumpyBackend

    return NumpyBackend.from_torch(model, tok)


def test_tree_drafting_keeps_the_cache_and_the_limits(greedy_models):
    tok = ByteTokenizer(300)
    draft = DraftModelProposer(_backend("numpy", greedy_models[1], tok))
    params = SamplingParams(temperature=1.0)
    shape = TreeShape(3, 4, max_nodes=10, max_paths=4)
    d = draft.propose_tree(PROMPT, shape, params, drafter_uniform(1))
    assert d.parents is not None and d.q is not None
    assert len(d.tokens) <= 10 and d.q.shape == (len(d.tokens), 300)
    t = DrawTree.build(d.tokens, d.parents)
    assert t.n_paths() <= 4 and t.depth() <= 4
    assert all(d.q[i, x] > 0 for i, x in enumerate(d.tokens))
    for i, par in enumerate(d.parents):  # siblings share their parent's q
        same = [j for j, pj in enumerate(d.parents) if pj == par]
        assert np.array_equal(d.q[i], d.q[same[0]])
    assert draft.backend.length(draft._seq) == len(PROMPT)  # only the committed text
    g = draft.propose_tree(PROMPT, TreeShape(3, 3), SamplingParams(), drafter_uniform(1))
    assert g.q is None and len(g.tokens) == 9
    roots = [x for x, par in zip(g.tokens, g.parents, strict=True) if par == -1]
    assert len(set(roots)) == len(roots)  # greedy branches on distinct top tokens


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("tree", ["2x3", "4x5", "auto"])
def test_greedy_tree_equals_target_greedy(kind, tree, greedy_models):
    tok = ByteTokenizer(300)
    target = _backend(kind, greedy_models[0], tok)
    req = GenerationRequest(PROMPT, max_new_tokens=48)
    reference = SpeculativeEngine(target).generate(req)
    shape = parse_tree(tree)
    if shape is None:  # auto under a memory-bound cost profile (a GPU-like target)
        policy = AdaptiveTree(k_max=6, learn_costs=False)
        policy.verify.add(1, 0.01)
        policy.verify.add(25, 0.012)
        policy.draft_per_token = 0.0005
    else:
        policy = FixedTree(*shape)
    for drafter in greedy_models[1:]:
        proposer = DraftModelProposer(_backend(kind, drafter, tok))
        res = SpeculativeEngine(target, [proposer], policy=policy).generate(req)
        assert res.token_ids == reference.token_ids
        st = res.stats
        assert st.target_passes < reference.stats.target_passes
        assert st.rejected_rounds > 0, "rollback/correction not exercised"
    if shape is None:
        assert any(w > 1 for w, d in policy.chosen if d), "auto never chose a tree"


def test_wider_trees_accept_more_than_chains(greedy_models):
    tok = ByteTokenizer(300)
    target = _backend("numpy", greedy_models[0], tok)
    req = GenerationRequest(PROMPT, max_new_tokens=48)
    tau = {}
    for w in (1, 4):
        proposer = DraftModelProposer(_backend("numpy", greedy_models[2], tok))
        res = SpeculativeEngine(target, [proposer], policy=FixedTree(w, 4)).generate(req)
        tau[w] = res.stats.mean_accepted_length
    assert tau[4] > tau[1]


def test_first_draw_run_follows_the_first_children():
    from specsplit.engine.speculative import _first_draw_run
    from specsplit.proposers.base import Draft

    # level 0: 5 (first), 6; level 1 under 5: 7 (first), 8; under 6: 9
    tree = Draft([5, 6, 7, 8, 9], None, [-1, -1, 0, 0, 1])
    assert _first_draw_run(tree, [5, 7]) == 2
    assert _first_draw_run(tree, [5, 8]) == 1  # the second child passed: the chain stopped
    assert _first_draw_run(tree, [6, 9]) == 0
    assert _first_draw_run(tree, []) == 0


def test_wide_rounds_teach_the_chain_and_a_sure_drafter_gets_a_chain():
    """Rounds of width-3 trees whose first draws all pass: width 1 learns it (it is never
    drafted on its own), and with wider trees costing more to draft the policy turns to a
    deep chain instead of staying wide on width 1's prior."""
    policy = AdaptiveTree(k_max=8, learn_costs=False)
    policy.verify.shape.update({n: 0.1 for n in range(1, 40)})  # memory-bound: flat
    policy.draft_per_token = 0.02
    prior = float(policy.alphas(1)[0])
    for _ in range(40):
        policy.update(TreeShape(3, 4), 4, 0.1, 13, 0.3, first_run=4)
    assert policy.alphas(1)[:4].min() > 0.9 > prior
    shape = policy.choose(8, 24, 32)
    assert shape.width == 1 and shape.depth == 8


# ---- sampled trees end to end: the emitted tokens follow the target ----

V = 8
N = 2500
SAMPLED_PROMPT = [1, 5, 2, 7, 3]


@pytest.fixture(scope="module")
def small_vocab_models():
    target = tiny_llama(vocab=V, seed=3)
    return target, perturbed(target, 0.5, seed=4)


def _exact_pair(target, params, skip_first: bool) -> dict[tuple[int, int], float]:
    """The target's exact distribution of new tokens (1, 2) (skip_first) or (0, 1)."""
    seq = target.new_sequence()

    def probs(ids):
        target.truncate(seq, 0)
        return logits_to_probs(target.forward(seq, SAMPLED_PROMPT + ids)[-1], params)

    out: dict[tuple[int, int], float] = {}
    p0 = probs([])
    for a in range(V):
        p1 = probs([a])
        if not skip_first:
            for b in range(V):
                out[(a, b)] = p0[a] * p1[b]
            continue
        for b in range(V):
            p2 = probs([a, b])
            for c in range(V):
                out[(b, c)] = out.get((b, c), 0.0) + p0[a] * p1[b] * p2[c]
    target.free_sequence(seq)
    return out


@pytest.mark.parametrize("which", ["tokens-0-1", "tokens-1-2"])
def test_sampled_tree_follows_target_distribution(which, small_vocab_models):
    """The first token comes from the prefill; the tree's depths 0 and 1 decide tokens 1
    and 2 (three draws per level, so repeats and merged nodes occur often with V = 8)."""
    params = SamplingParams(temperature=1.0, top_p=0.9)
    tok = TinyTokenizer(V)
    skip = which == "tokens-1-2"
    kind = "torch" if skip else "numpy"  # (the tree attention on both; numpy is 3x faster)
    target = _backend(kind, small_vocab_models[0], tok)
    draft = DraftModelProposer(_backend(kind, small_vocab_models[1], tok))
    engine = SpeculativeEngine(target, [draft], policy=FixedTree(3, 2))
    counts: Counter = Counter()
    accepted = 0
    for seed in range(N):
        res = engine.generate(GenerationRequest(SAMPLED_PROMPT, 3, params, seed=seed))
        counts[tuple(res.token_ids[1:3] if skip else res.token_ids[:2])] += 1
        accepted += res.stats.accepted
    assert accepted > N * 0.3
    _assert_matches(counts, _exact_pair(target, params, skip))


def test_fixed_tree_same_seed_replays(small_vocab_models):
    tok = TinyTokenizer(V)
    target = _backend("numpy", small_vocab_models[0], tok)
    draft = DraftModelProposer(_backend("numpy", small_vocab_models[1], tok))
    engine = SpeculativeEngine(target, [draft], policy=FixedTree(3, 3))
    params = SamplingParams(temperature=1.0)
    runs = [
        engine.generate(GenerationRequest(SAMPLED_PROMPT, 20, params, seed=s)).token_ids
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_parse_tree():
    assert parse_tree("auto") is None
    assert parse_tree("3x4") == (3, 4)
    for bad in ("3", "0x2", "ax2", "3x-1"):
        with pytest.raises(ConfigError):
            parse_tree(bad)


def test_batched_tree_rounds_keep_within_the_targets_paths(greedy_models):
    """Several sessions' trees in one scheduler: a target that holds 4 paths at once (as
    llama.cpp holds 32) never gets more in one pass, and every text stays exact."""
    from concurrent.futures import ThreadPoolExecutor

    from specsplit.engine.scheduler import BatchScheduler, ScheduledVerifier
    from specsplit.engine.speculative import DecodeLoop

    tok = ByteTokenizer(300)
    target = _backend("torch", greedy_models[0], tok)
    target.max_tree_paths = 4
    seen: list[int] = []
    inner = target.forward_batch

    def counted(items):  # noqa: ANN001, ANN202
        seen.append(sum(len(p) - len(set(p) - {-1}) for _, _, p in items if p is not None))
        return inner(items)

    target.forward_batch = counted
    prompts = [PROMPT[: 6 + 2 * i] for i in range(3)]
    refs = [SpeculativeEngine(target).generate(GenerationRequest(p, 24)).token_ids for p in prompts]
    sch = BatchScheduler(target, batch_window=0.05)
    sch.start()
    try:

        def run(p):  # noqa: ANN001, ANN202
            drafter = DraftModelProposer(_backend("torch", greedy_models[1], tok))
            loop = DecodeLoop(ScheduledVerifier(sch), [drafter], FixedTree(3, 3))
            return loop.generate(GenerationRequest(p, 24)).token_ids

        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(run, prompts))
    finally:
        sch.stop()
    assert got == refs
    assert seen and max(seen) <= 4
    assert max(sch.stats.batch_sizes) > 1
