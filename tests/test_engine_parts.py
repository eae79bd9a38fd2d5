"""The engine's parts: n-gram lookup, the K policy, stopping and streaming text."""

from __future__ import annotations

import numpy as np
import pytest

from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.engine.draft_length import AdaptiveK, CostTable, FixedK
from specsplit.engine.speculative import DecodeLoop
from specsplit.engine.stopping import TextStream
from specsplit.proposers.ngram import NGramProposer
from specsplit.randomness import Sequential
from specsplit.sampling import GREEDY

RNG = Sequential(0)


def test_ngram_proposes_continuation_of_latest_match():
    p = NGramProposer(max_ngram=2, min_ngram=1)
    assert p.propose([1, 2, 3, 4, 9, 1, 2, 5, 6, 1, 2], 2, GREEDY, RNG).tokens == [5, 6]
    assert p.propose([1, 2, 3, 4, 9, 1, 2, 5, 6, 1, 2, 5], 3, GREEDY, RNG).tokens == [6, 1, 2]


def test_ngram_prefers_longer_match_and_handles_rollback():
    p = NGramProposer(max_ngram=3, min_ngram=1)
    ctx = [7, 1, 2, 8, 3, 1, 2, 9, 3, 1, 2]
    assert p.propose(ctx, 2, GREEDY, RNG).tokens == [9, 3]  # "3 1 2" matched
    assert p.propose([5, 6, 5], 2, GREEDY, RNG).tokens == [6, 5]  # not an extension: rebuilt
    assert p.propose([4, 4, 3], 2, GREEDY, RNG).tokens == []
    assert p.propose([], 2, GREEDY, RNG).tokens == []


def test_fixed_k_respects_limit():
    assert FixedK(5).choose(3) == 3
    assert FixedK(5).choose(-1) == 0


def test_cost_table_interpolates_and_extrapolates():
    t = CostTable()
    t.add(1, 0.01)
    t.add(5, 0.05)
    assert t(3) == pytest.approx(0.03)
    assert t(9) == pytest.approx(0.09)


def test_cost_table_relearns_a_shape_the_calibration_got_wrong():
    # calibrated flat (a noisy warm-up), while a pass over 7 tokens really costs 1.6x one
    t = CostTable()
    t.add(1, 0.40)
    t.add(7, 0.40)
    for i in range(60):
        t.add(7, 0.44) if i % 3 == 0 else t.add(1, 0.27)
    assert t(1) == pytest.approx(0.27, rel=0.05)
    assert t(7) / t(1) == pytest.approx(0.44 / 0.27, rel=0.1)


def _policy(costs: dict[int, float], per_token: float, alpha: float) -> AdaptiveK:
    p = AdaptiveK(k_max=12, probe_every=10**9)
    for n, c in costs.items():
        p.verify.add(n, c)
    p.draft_per_token = per_token
    p.acc[:] = 1000 * alpha
    p.prop[:] = 1000
    return p


def test_adaptive_k_zero_when_verification_is_compute_bound():
    # llama.cpp-like target on this CPU: verifying n tokens costs about n/2 single passes
    costs = {1: 0.031, 5: 0.081, 9: 0.140, 17: 0.157}
    assert _policy(costs, 0.018, 0.9).choose(100) == 0


def test_adaptive_k_long_when_verification_is_memory_bound():
    costs = {1: 0.338, 5: 0.40, 9: 0.45, 17: 0.74}  # torch fp32 target
    k = _policy(costs, 0.018, 0.85).choose(100)
    assert k >= 6
    assert _policy(costs, 0.018, 0.85).choose(3) == 3


def test_a_policy_says_whether_its_next_round_drafts_without_counting_a_round():
    from specsplit.engine.tree_policy import AdaptiveTree, FixedTree

    assert FixedK(3).drafts(5) and not FixedK(3).drafts(0) and not FixedK(0).drafts(5)
    assert FixedTree(2, 3).drafts(4) and not FixedTree(2, 3).drafts(0)
    llama = _policy({1: 0.031, 5: 0.081, 9: 0.140, 17: 0.157}, 0.018, 0.9)
    torch = _policy({1: 0.338, 5: 0.40, 9: 0.45, 17: 0.74}, 0.018, 0.85)
    assert not llama.drafts(100) and torch.drafts(100) and not torch.drafts(0)
    llama.probe_every = 1
    assert not llama.drafts(100) and llama.chosen == []  # (a probe is choose's, not drafts')
    tree = AdaptiveTree(k_max=6, learn_costs=False)
    tree.verify.add(1, 0.01)
    tree.verify.add(25, 0.012)
    tree.draft_per_token = 0.0005
    assert tree.drafts(6)
    tree.draft_per_token = 10.0  # drafting looks hopelessly slow
    assert not tree.drafts(6) and tree.chosen == []


def test_adaptive_k_probes_after_long_run_of_zero():
    # cheap verification, but the drafter has been failing: K = 0, with a probe now and then
    p = _policy({1: 0.1, 5: 0.12}, 0.01, 0.05)
    p.probe_every = 4
    assert [p.choose(10) for _ in range(4)] == [0, 0, 0, 2]


def test_a_probe_waits_while_its_drafters_catch_up_would_cost_more_than_it_may():
    # as above, but the drafter would first read a prompt it skipped: 0.2 s, and a probe may
    # spend a quarter of the plain rounds (0.1 s each) since the last one: 8 rounds
    p = _policy({1: 0.1, 5: 0.12}, 0.01, 0.05)
    p.probe_every = 4
    p.catch_up_s = 0.2
    assert [p.choose(10) for _ in range(8)] == [0] * 7 + [2]
    p.catch_up_s = 0.0
    assert [p.choose(10) for _ in range(4)] == [0, 0, 0, 2]


def test_adaptive_k_does_not_probe_when_even_full_acceptance_cannot_pay():
    p = _policy({1: 0.03, 5: 0.2}, 0.05, 0.5)
    p.probe_every = 2
    assert [p.choose(10) for _ in range(6)] == [0] * 6


def _rounds(p: AdaptiveK, alphas: list[float], n: int, rng: np.random.Generator) -> float:
    """n rounds whose draft tokens pass with conditional probabilities alphas; tokens per
    second under the policy's own (fixed) costs."""
    tokens = seconds = 0.0
    for _ in range(n):
        k = p.choose(12)
        a = 0
        while a < k and rng.random() < alphas[a]:
            a += 1
        p.update(k, a, p.verify(k + 1), k + 1, p.draft_per_token)
        tokens += a + 1
        seconds += p.draft_per_token * k + p.verify(k + 1)
    return tokens / seconds


def test_adaptive_k_relearns_acceptance_when_a_new_text_begins():
    # after a long request the drafter predicted well (code), a chat request it predicts
    # worse: over its 40 rounds the policy reaches 0.85x of the best fixed K's rate there
    # (carrying every earlier count at full weight, it stays at long K: 0.69x in this setup)
    code, chat = [0.97] * 12, [0.62, 0.88, 0.82, 0.5, 0.55, 0.8, 0.25, 0.5, 0.5, 0.3, 0.3, 0.3]
    rates = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        p = AdaptiveK(k_max=12, learn_costs=False)
        p.verify.shape.update({1: 0.4, 13: 0.45})
        p.draft_per_token = 0.05
        _rounds(p, code, 200, rng)
        p.new_request()
        rates.append(_rounds(p, chat, 40, rng))
    best = max((1 + np.cumprod(chat[:k]).sum()) / (0.05 * k + p.verify(k + 1)) for k in range(13))
    assert np.mean(rates) >= 0.85 * best


def test_text_stream_holds_back_partial_utf8():
    tok = ByteTokenizer()
    s = TextStream(tok)
    ids = list("aé".encode())
    assert s.update(ids[:2]) == "a"  # first byte of é alone: held back
    assert s.update(ids) == "é"


def test_text_stream_holds_back_possible_stop_string_and_cuts_at_it():
    tok = ByteTokenizer()
    s = TextStream(tok, stop=["END"])
    ids = list(b"hello EN")
    assert s.update(ids) == "hello "  # "EN" may become "END"
    ids = list(b"hello END and more")
    cut = s.find_stop(ids)
    assert cut == len(b"hello END")
    assert s.update(ids[:cut], final=True) == ""
    assert s.emitted == "hello "


def test_cut_at_eos_and_budget():
    assert DecodeLoop._cut([5, 6, 9, 7], 10, frozenset({9})) == ([5, 6], "eos")
    assert DecodeLoop._cut([5, 6, 9, 7], 2, frozenset({9})) == ([5, 6], "length")
    assert DecodeLoop._cut([5, 6], 3, frozenset({9})) == ([5, 6], None)


def test_drafting_ahead_stops_where_it_slows_drafting_down():
    from specsplit.engine.speculative import PIPELINE_RETRY
    from specsplit.engine.verifier import LocalVerifier

    class _Remote(LocalVerifier):
        pipelines = True

    loop = DecodeLoop(_Remote.__new__(_Remote), [NGramProposer()])
    assert loop.pipeline and loop._ahead_pays()  # nothing measured yet
    loop._draft_cost = {False: 0.010, True: 0.012}
    assert loop._ahead_pays()  # about as fast during a pass: keep drafting ahead
    loop._draft_cost = {False: 0.010, True: 0.050}  # five times slower: the CPU is shared
    answers = [loop._ahead_pays() for _ in range(PIPELINE_RETRY)]
    assert answers.count(True) == 1 and answers[-1]  # only the periodic re-measurement
