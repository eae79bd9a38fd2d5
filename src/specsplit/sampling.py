"""Logits -> probabilities under a request's sampling settings (temperature, top-k, top-p, min-p).

Math layer: pure NumPy, no model, no I/O. The order is fixed and documented once:
temperature, then top-k, then top-p (nucleus), then min-p, each applied to the distribution
left by the previous step. temperature == 0 means greedy: a one-hot distribution at the
argmax (ties broken towards the lowest token id, as ``np.argmax`` does).

p (the target's distribution) and q (the drafter's) are both made by ``logits_to_probs``
from their own logits under the same settings; a drafter may then truncate q to its top-m
tokens and quantize it (``truncate_top_m``, ``quantize``); the verifier uses the q it gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from specsplit.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampling settings; the defaults mean plain greedy decoding."""

    temperature: float = 0.0  # 0 = greedy; > 0 scales logits by 1/temperature
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set with cumulative probability >= top_p; 1 = off
    min_p: float = 0.0  # drop tokens with probability < min_p * max probability; 0 = off

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise ConfigError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.min_p) and 0.0 <= self.min_p < 1.0):
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()


def _softmax(x: np.ndarray) -> np.ndarray:
    """Stable softmax over the last axis, float64."""
    x = x.astype(np.float64, copy=False)
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _top_p_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask [V] of the nucleus: the smallest top set whose mass reaches top_p.

    Exact, without sorting the whole vocabulary: look at the top m tokens (m doubling)
    until their mass reaches top_p, then sort just those.
    """
    v = probs.shape[-1]
    m = min(64, v)
    while True:
        idx = np.argpartition(-probs, m - 1)[:m] if m < v else np.arange(v)
        if probs[idx].sum() >= top_p or m == v:
            break
        m = min(2 * m, v)
    order = idx[np.lexsort((idx, -probs[idx]))]  # descending prob, ties by lower id
    csum = np.cumsum(probs[order])
    n_keep = int(np.searchsorted(csum, top_p * (1 - 1e-12), side="left")) + 1
    mask = np.zeros(v, dtype=bool)
    mask[order[: min(n_keep, len(order))]] = True
    return mask


def _probs_row(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """One row: logits [V] -> probabilities [V] (float64, sums to 1)."""
    if params.greedy:
        out = np.zeros(logits.shape[-1], dtype=np.float64)
        out[int(np.argmax(logits))] = 1.0
        return out
    x = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x >= kth, x, -np.inf)  # ties at the k-th value are all kept
    probs = _softmax(x)
    if params.top_p < 1.0:
        probs = np.where(_top_p_mask(probs, params.top_p), probs, 0.0)
        probs /= probs.sum()
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


def logits_to_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """logits [..., V] -> final sampling distribution [..., V] (float64)."""
    logits = np.asarray(logits)
    if logits.ndim == 1:
        return _probs_row(logits, params)
    flat = logits.reshape(-1, logits.shape[-1])
    return np.stack([_probs_row(r, params) for r in flat]).reshape(logits.shape[:-1] + (-1,))


def sample(probs: np.ndarray, u: float) -> int:
    """The token id of probs [V] at uniform u in [0, 1) (inverse CDF; see ``randomness``)."""
    c = np.cumsum(probs)
    return int(min(np.searchsorted(c, u * c[-1], side="right"), probs.shape[-1] - 1))


def truncate_top_m(probs: np.ndarray, m: int) -> np.ndarray:
    """Keep the m most likely tokens of probs [V] and renormalise (a drafter's compact q)."""
    if m <= 0 or m >= probs.shape[-1] or np.count_nonzero(probs) <= m:
        return probs
    idx = np.argpartition(-probs, m - 1)[:m]
    out = np.zeros_like(probs)
    out[idx] = probs[idx]
    return out / out.sum()


QUANT_BITS = 16  # a quantized q is integer counts summing to 2**QUANT_BITS


def quantize(probs: np.ndarray, m: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """probs [V] -> (ids [n] int64, counts [n] int64 >= 1) with counts summing to 2**QUANT_BITS.

    Optionally keeps only the top m tokens first. Largest-remainder rounding in O(V): each
    token gets floor(p * 2**16) units and the units left over go, one each, to the tokens
    with the largest remainders. A token left with no unit is dropped: the drafter samples
    from exactly counts / 2**16, so it can never be drafted, and q stays exact.
    """
    total = 1 << QUANT_BITS
    p = truncate_top_m(probs, m) if m else probs
    ids = np.flatnonzero(p)  # [n]
    w = p[ids] / p[ids].sum() * total  # [n] ideal (real) counts, summing to total
    counts = np.floor(w).astype(np.int64)  # [n]
    left = total - int(counts.sum())  # 0 <= left <= n
    if left > 0:
        top = np.argpartition(-(w - counts), left - 1)[:left]  # largest remainders
        counts[top] += 1
    keep = counts > 0
    return ids[keep].astype(np.int64), counts[keep]


def dequantize(ids: np.ndarray, counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """(ids [n], counts [n]) -> the dense distribution [V] they stand for, exactly."""
    out = np.zeros(vocab_size, dtype=np.float64)
    out[ids] = counts / float(1 << QUANT_BITS)
    return out


@dataclass(frozen=True)
class SparseRows:
    """Rows of distributions over a vocabulary, each kept as (ids [n], probs [n]): a q that
    came over the wire. A round waits in the server's queue with these (a few hundred bytes a
    row) and becomes dense [k, V] float64 only when it is planned for a pass (``dense``):
    held dense, every queued sampled round cost k x V x 8 bytes (1.6 MB at K = 4 on SmolLM2,
    4.9 MB on Qwen), which the soak saw as memory per active session."""

    rows: tuple[tuple[np.ndarray, np.ndarray], ...]
    vocab: int

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.vocab)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: slice) -> SparseRows:
        if not isinstance(key, slice):
            raise TypeError("SparseRows are sliced by rows; use dense() to read values")
        return SparseRows(self.rows[key], self.vocab)

    def dense(self) -> np.ndarray:
        """[k, V] float64, exactly the rows' probabilities."""
        q = np.zeros(self.shape, dtype=np.float64)
        for i, (ids, probs) in enumerate(self.rows):
            q[i, ids] = probs
        return q
