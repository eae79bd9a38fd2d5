"""Verification of a token tree drawn by one drafter (SpecInfer's multi-step speculative
sampling over a tree of i.i.d. draws; EAGLE-2 / Sequoia shape the tree, not this rule).

Math layer: pure NumPy, no model, no I/O. p is the target's distribution, q the drafter's.

A *draw tree* lists the drafter's draws in order: draw i is token ``tokens[i]``, drawn after
the path to draw ``parents[i]`` (-1: after the committed text) from the distribution
``q[i]`` (the drafter's q at that parent; siblings share it). Draws with the same path (a
token drawn twice under one parent) land on one *node* of the merged ``TokenTree`` the
target sees, so the target pass holds each distinct path once.

Verification walks down from the root. At the current node (the accepted path so far) it
tries the draws made there: every draw whose parent lies on that node, in draw order; the
j-th tried is tested with uniform ``u(position, j)`` against the residual left by the ones
rejected before it, with its own q row (recursive rejection sampling). The first accepted
draw moves the walk to its node; if all are rejected the correction token comes from the
final residual (slot ``SAMPLE``); a node without draws gives the bonus token from p there.

Why this is exact (the output at every position is distributed as p given the text before):
at a node with residual r (r = p on arrival), one try of x ~ q accepts y with probability
min(q(y), r(y)) and otherwise leaves exactly norm(max(0, r - q)) as what the rest must
produce, so by induction over the tries and the final residual draw the token emitted at the
node has distribution p, provided each tried draw is a fresh sample of q, independent of the
uniforms and of the draws tried before it, and the number of draws tried does not depend on
their values. A drafter keeps that if the number of children it draws at a node depends only
on the text up to the node and on q there (never on the values drawn for those children),
and the children are i.i.d. from q (``draft_tree`` allocates each level's counts before
drawing it). Repeats are allowed: a token rejected once has residual 0 and is rejected
again, and the residual update for the repeat is part of the rule. Merging repeats into one
node is exact too: a repeat is never accepted after its twin was rejected, so when a node is
reached none of its draws was tried, and the union of their children is again a set of
i.i.d. draws from q at that node whose count depends on nothing drawn below the node. Several
independent drafters' chains are a special case (each chain a path of draws, chain order =
draw order), which is the rule ``verify.verify_tree`` applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specsplit.errors import ConfigError
from specsplit.randomness import SAMPLE, Uniform
from specsplit.sampling import sample
from specsplit.verify import TokenTree, Verdict, _accept, _q_at, _q_row, _residual


@dataclass(frozen=True)
class DrawTree:
    """A drafter's draws and the merged tree the target verifies (see the module docstring)."""

    tokens: tuple[int, ...]  # [n] draw i's token
    parents: tuple[int, ...]  # [n] draw i's parent draw, -1 for the committed text
    node: tuple[int, ...]  # [n] the node of ``tree`` draw i lands on
    tree: TokenTree  # [m <= n] distinct paths; tree.parents index nodes (-1: root)
    kids: tuple[tuple[int, ...], ...]  # [m + 1] draws made at the root (0) and node i (1 + i)

    @staticmethod
    def build(tokens: Sequence[int], parents: Sequence[int]) -> DrawTree:
        if len(tokens) != len(parents):
            raise ConfigError(f"{len(parents)} parents for {len(tokens)} draft tokens")
        toks: list[int] = []
        tparents: list[int] = []
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        node: list[int] = []
        kids: list[list[int]] = [[]]
        for i, (x, par) in enumerate(zip(tokens, parents, strict=True)):
            par = int(par)
            if not -1 <= par < i:
                raise ConfigError(f"parents[{i}] = {par}: must be -1 or an earlier draw")
            at = -1 if par < 0 else node[par]
            kids[1 + at].append(i)
            key = (at, int(x))
            if key not in index:
                index[key] = len(toks)
                toks.append(int(x))
                tparents.append(at)
                kids.append([])
            node.append(index[key])
        tree = TokenTree(tuple(toks), tuple(tparents), ())
        return DrawTree(
            tuple(int(t) for t in tokens),
            tuple(int(p) for p in parents),
            tuple(node),
            tree,
            tuple(tuple(k) for k in kids),
        )

    def depth(self) -> int:
        """Draws on the longest path (the most draft tokens one round can accept)."""
        d = [0] * len(self.tokens)
        for i, par in enumerate(self.parents):
            d[i] = 1 + (d[par] if par >= 0 else 0)
        return max(d, default=0)

    def n_paths(self) -> int:
        """Root-to-leaf paths of the merged tree (leaves)."""
        inner = {p for p in self.tree.parents if p >= 0}
        return len(self.tree.tokens) - len(inner)


def verify_draw_tree(
    draws: DrawTree, q: np.ndarray | None, p: np.ndarray, u: Uniform, base: int = 0
) -> Verdict:
    """Recursive rejection sampling down a draw tree (see the module docstring).

    q [n, V] (row i: what draw i was sampled from) or None (one-hot); p [m + 1, V]: row 0 is
    the target's distribution after the committed text, row 1 + i the one after node i.
    Depth d is the token at position base + d. Verdict.path lists the accepted nodes.
    """
    path: list[int] = []
    at = -1
    while True:
        depth, residual = len(path), p[1 + at]
        tried = draws.kids[1 + at]
        if not tried:  # a leaf: every draft token on the path passed
            return Verdict(depth, sample(residual, u(base + depth, SAMPLE)), 0, tuple(path))
        for slot, i in enumerate(tried):
            x = draws.tokens[i]
            if _accept(u(base + depth, slot), float(residual[x]), _q_at(q, i, x)):
                at = draws.node[i]
                path.append(at)
                break
            residual = _residual(residual, _q_row(q, i, x, p.shape[-1]))
        else:
            return Verdict(depth, sample(residual, u(base + depth, SAMPLE)), 0, tuple(path))


def verify_draw_tree_greedy(draws: DrawTree, target_argmax: Sequence[int]) -> Verdict:
    """Greedy verification: follow the target's argmax while a draw made there matches.

    target_argmax [m + 1]: row 0 after the committed text, row 1 + i after node i.
    """
    path: list[int] = []
    at = -1
    while True:
        nxt = int(target_argmax[1 + at])
        match = [draws.node[i] for i in draws.kids[1 + at] if draws.tokens[i] == nxt]
        if not match:
            return Verdict(len(path), nxt, 0, tuple(path))
        at = match[0]
        path.append(at)
