"""Hand-built checks of logits -> probabilities, truncation and quantization."""

import numpy as np
import pytest

from specsplit.errors import ConfigError
from specsplit.sampling import (
    QUANT_BITS,
    SamplingParams,
    dequantize,
    logits_to_probs,
    quantize,
    sample,
    truncate_top_m,
)

LOGITS = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05]))


def test_greedy_is_one_hot_at_argmax():
    assert logits_to_probs(LOGITS, SamplingParams()).tolist() == [1, 0, 0, 0, 0]


def test_temperature_one_recovers_softmax():
    np.testing.assert_allclose(
        logits_to_probs(LOGITS, SamplingParams(temperature=1.0)), [0.4, 0.3, 0.15, 0.1, 0.05]
    )


def test_temperature_sharpens():
    p = logits_to_probs(LOGITS, SamplingParams(temperature=0.5))
    expected = np.array([0.4, 0.3, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(p, expected / expected.sum())


def test_top_k():
    p = logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(p, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0])


def test_top_p_keeps_smallest_set_reaching_p():
    p = logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(p, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0])
    p = logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.71))
    np.testing.assert_allclose(p, np.array([0.4, 0.3, 0.15, 0, 0]) / 0.85)


def test_top_p_large_vocab_matches_full_sort():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=5000) * 3
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.9))
    full = np.exp(logits - logits.max())
    full /= full.sum()
    order = np.argsort(-full)
    n = np.searchsorted(np.cumsum(full[order]), 0.9) + 1
    expected = np.zeros_like(full)
    expected[order[:n]] = full[order[:n]]
    np.testing.assert_allclose(p, expected / expected.sum())


def test_min_p_relative_to_max():
    p = logits_to_probs(LOGITS, SamplingParams(temperature=1.0, min_p=0.3))
    # threshold 0.3 * 0.4 = 0.12: keeps 0.4, 0.3, 0.15
    np.testing.assert_allclose(p, np.array([0.4, 0.3, 0.15, 0, 0]) / 0.85)


def test_order_top_k_then_top_p():
    p = logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_k=3, top_p=0.6))
    # after top-k: .4/.85=.47, .3/.85=.35, .15/.85=.18 -> nucleus 0.6 keeps two
    np.testing.assert_allclose(p, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0])


def test_batched_rows():
    p = logits_to_probs(np.stack([LOGITS, LOGITS[::-1]]), SamplingParams(temperature=1.0))
    np.testing.assert_allclose(p[1], [0.05, 0.1, 0.15, 0.3, 0.4])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"temperature": float("nan")},
        {"top_k": -3},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": 1.0},
        {"min_p": -0.1},
    ],
)
def test_invalid_settings_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def test_sample_follows_distribution():
    rng = np.random.default_rng(1)
    probs = np.array([0.5, 0.0, 0.25, 0.25])
    draws = np.bincount([sample(probs, rng.random()) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(draws, probs, atol=0.015)
    assert draws[1] == 0


def test_truncate_top_m():
    q = truncate_top_m(np.array([0.4, 0.3, 0.15, 0.1, 0.05]), 2)
    np.testing.assert_allclose(q, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0])


def test_quantize_is_exact_and_keeps_support():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(1000) * 0.05)
    ids, counts = quantize(probs, m=64)
    assert len(ids) <= 64 and counts.sum() == 1 << QUANT_BITS and counts.min() >= 1
    q = dequantize(ids, counts, 1000)
    assert abs(q.sum() - 1.0) < 1e-12
    top = np.argsort(-probs)[:64]
    assert set(ids.tolist()) <= set(top.tolist())
    kept = truncate_top_m(probs, 64)
    assert np.abs(q - kept).max() < 2.0 / (1 << QUANT_BITS)


def test_quantize_a_large_vocabulary_whole():
    """m = 0 on Qwen's 151,936 tokens: q stays close to p (not uniform, as when every token
    was forced to one count), the counts are exact, and only tokens with no unit drop."""
    rng = np.random.default_rng(3)
    probs = logits_to_probs(rng.normal(size=151_936) * 4, SamplingParams(temperature=1.0))
    ids, counts = quantize(probs, m=0)
    assert counts.sum() == 1 << QUANT_BITS and counts.min() >= 1
    q = dequantize(ids, counts, len(probs))
    assert 0.5 * np.abs(q - probs).sum() < 0.05  # about the mass of tokens below one unit
    top = np.argsort(-probs)[:50]
    np.testing.assert_allclose(q[top], probs[top], atol=1.0 / (1 << QUANT_BITS))


def test_quantize_hands_leftover_units_to_the_largest_remainders():
    # 2**16 * (0.5, 0.3, 0.2) = 32768, 19660.8, 13107.2: one unit left, to the 0.8 remainder
    ids, counts = quantize(np.array([0.5, 0.3, 0.2]))
    assert dict(zip(ids.tolist(), counts.tolist())) == {0: 32768, 1: 19661, 2: 13107}
    # a token worth less than one unit is dropped (it can never be sampled), none forced in
    tiny = np.array([1 - 1e-7, 1e-7])
    ids, counts = quantize(tiny)
    assert ids.tolist() == [0] and counts.tolist() == [1 << QUANT_BITS]


def test_sparse_rows_hold_a_wire_q_exactly_and_small():
    from specsplit.proposers.base import Draft
    from specsplit.sampling import SparseRows, quantize
    from specsplit.transport import wire

    vocab = 49_152
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(4):
        p = rng.dirichlet(np.full(vocab, 0.01))
        rows.append(dequantize(*quantize(p, 64), vocab))  # what an edge samples from
    q = np.stack(rows)  # [4, V]
    tokens = [int(np.argmax(r)) for r in rows]
    back = wire.drafts_from_pb(wire.drafts_to_pb([Draft(tokens, q)]), vocab, 16, greedy=False)[0]
    assert isinstance(back.q, SparseRows) and back.q.shape == (4, vocab)
    assert np.array_equal(back.q.dense(), q)
    assert np.array_equal(back.q[:2].dense(), q[:2])
    held = sum(ids.nbytes + probs.nbytes for ids, probs in back.q.rows)
    assert held <= 4 * 64 * 16 < q.nbytes // 100  # not the 1.6 MB of a dense [4, V] float64
