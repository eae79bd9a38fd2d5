"""Verification of draft tokens against the target: greedy, one chain, several chains (a tree).

Math layer: pure NumPy, no model, no I/O. Names follow the papers: p is the target's
distribution, q the drafter's (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative
Sampling"; Miao et al. 2024, "SpecInfer", for several drafts per position).

One verification round over K draft tokens emits:
- accepted tokens: the longest run of draft tokens that pass the test, in order;
- a correction token: at the first rejection, one token from norm(max(0, p - q)) (for
  several drafts at one position, the residual after every rejected child), then stop;
- a bonus token: if every draft token passes, one token from the target's next distribution.
So a round emits n_accepted + 1 tokens, and mean accepted length tau = tokens / rounds >= 1.

A drafter's q is exactly what it sampled from (after temperature, top-k, top-p, min-p and any
truncation or quantization); ``None`` stands for a one-hot q at the drafted token (a greedy
drafter, or a deterministic one such as n-gram lookup).

Randomness is keyed by position (``randomness``): ``u(position, slot)`` is the uniform for a
decision about the token at ``position``; ``base`` is the position of the round's first
draft token. The accept test of the j-th child tried at a position uses slot j; the
correction or bonus draw uses slot ``SAMPLE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from specsplit.randomness import SAMPLE, Uniform
from specsplit.sampling import sample


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification round."""

    n_accepted: int  # draft tokens accepted (along the followed chain)
    next_token: int  # the correction token (n_accepted < chain length) or the bonus token
    chain: int = 0  # index of the chain followed (multi-draft); 0 for a single chain
    path: tuple[int, ...] = field(default=())  # tree node ids of the accepted tokens


def _accept(u: float, p_x: float, q_x: float) -> bool:
    """The rejection-sampling test: accept x with probability min(1, p(x) / q(x))."""
    return u * q_x < p_x


def _residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)) [V]; p itself if nothing is left (only reachable by rounding)."""
    r = np.maximum(p - q, 0.0)
    s = r.sum()
    return r / s if s > 0 else p


def _q_row(q: np.ndarray | None, i: int, x: int, vocab: int) -> np.ndarray:
    """The drafter's distribution [V] for draft position i (one-hot at x if q is None)."""
    if q is not None:
        return q[i]
    row = np.zeros(vocab, dtype=np.float64)
    row[x] = 1.0
    return row


def _q_at(q: np.ndarray | None, i: int, x: int) -> float:
    return 1.0 if q is None else float(q[i, x])


def verify_greedy(draft: Sequence[int], target_argmax: Sequence[int]) -> Verdict:
    """Greedy verification: accept while the draft equals the target's argmax.

    draft [K]; target_argmax [K+1] (argmax of the target logits after the last committed
    token and after each draft token).
    """
    n = 0
    while n < len(draft) and draft[n] == target_argmax[n]:
        n += 1
    return Verdict(n, int(target_argmax[n]), 0, tuple(range(n)))


def verify_chain(
    draft: Sequence[int], q: np.ndarray | None, p: np.ndarray, u: Uniform, base: int = 0
) -> Verdict:
    """Speculative sampling over one chain (Leviathan et al. Algorithm 1; Chen et al.).

    draft [K]; q [K, V] or None (one-hot); p [K+1, V] the target's distributions; draft[i]
    is the token at position base + i.
    """
    for i, x in enumerate(draft):
        if not _accept(u(base + i, 0), float(p[i, x]), _q_at(q, i, x)):
            residual = _residual(p[i], _q_row(q, i, x, p.shape[-1]))
            return Verdict(i, sample(residual, u(base + i, SAMPLE)), 0, tuple(range(i)))
    k = len(draft)
    return Verdict(k, sample(p[k], u(base + k, SAMPLE)), 0, tuple(range(k)))


@dataclass(frozen=True)
class TokenTree:
    """Several draft chains merged into a prefix tree, for one target pass over all of them.

    Node i holds token tokens[i]; parents[i] is its parent node (-1: the last committed
    token, the root). node_of[j][d] is the node of chain j's d-th token.
    """

    tokens: tuple[int, ...]  # [n]
    parents: tuple[int, ...]  # [n]
    node_of: tuple[tuple[int, ...], ...]  # per chain, [len(chain)]

    @staticmethod
    def from_chains(chains: Sequence[Sequence[int]]) -> TokenTree:
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        node_of = []
        for chain in chains:
            parent, nodes = -1, []
            for x in chain:
                key = (parent, int(x))
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(int(x))
                    parents.append(parent)
                parent = index[key]
                nodes.append(parent)
            node_of.append(tuple(nodes))
        return TokenTree(tuple(tokens), tuple(parents), tuple(node_of))

    def __len__(self) -> int:
        return len(self.tokens)


def verify_tree(
    chains: Sequence[Sequence[int]],
    qs: Sequence[np.ndarray | None],
    tree: TokenTree,
    p: np.ndarray,
    u: Uniform,
    base: int = 0,
) -> Verdict:
    """Recursive rejection sampling over several draft chains (SpecInfer, multi-draft).

    chains[j] [K_j] with qs[j] [K_j, V] or None (one-hot): chain j and the distribution its
    drafter sampled each token from. p [len(tree) + 1, V]: row 0 is the target's
    distribution after the last committed token, row 1 + i the one after tree node i.
    At each accepted node, the children proposed by the chains still alive are tried in
    chain order, each against the residual left by the rejected ones and the q of the
    drafter that proposed it (the j-th child tried draws slot j); if all are rejected, the
    correction token comes from the final residual. Chains drafted independently keep this
    exact. Depth d is the token at position base + d.
    """
    alive = list(range(len(chains)))
    path: list[int] = []
    row = p[0]
    chain = 0
    for depth in range(max((len(c) for c in chains), default=0)):
        residual = row
        winner = None
        tried = (j for j in alive if len(chains[j]) > depth)
        for slot, j in enumerate(tried):
            x = int(chains[j][depth])
            if _accept(u(base + depth, slot), float(residual[x]), _q_at(qs[j], depth, x)):
                winner = j
                break
            residual = _residual(residual, _q_row(qs[j], depth, x, p.shape[-1]))
        if winner is None:
            return Verdict(depth, sample(residual, u(base + depth, SAMPLE)), chain, tuple(path))
        chain, x = winner, int(chains[winner][depth])
        alive = [j for j in alive if len(chains[j]) > depth and chains[j][depth] == x]
        path.append(tree.node_of[winner][depth])
        row = p[1 + path[-1]]
        if not any(len(chains[j]) > depth + 1 for j in alive):
            break
    return Verdict(len(path), sample(row, u(base + len(path), SAMPLE)), chain, tuple(path))


def verify_tree_greedy(
    chains: Sequence[Sequence[int]], tree: TokenTree, target_argmax: Sequence[int]
) -> Verdict:
    """Greedy verification of several chains: follow the tree along the target's argmax.

    target_argmax [len(tree) + 1]: row 0 after the last committed token, 1 + i after node i.
    """
    alive = list(range(len(chains)))
    path: list[int] = []
    chain = 0
    nxt = int(target_argmax[0])
    depth = 0
    while True:
        match = [j for j in alive if len(chains[j]) > depth and chains[j][depth] == nxt]
        if not match:
            return Verdict(depth, nxt, chain, tuple(path))
        chain, alive = match[0], match
        path.append(tree.node_of[chain][depth])
        nxt = int(target_argmax[1 + path[-1]])
        depth += 1
