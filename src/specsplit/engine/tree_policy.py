"""Choosing a one-drafter tree's shape (width per level, depth) from costs and acceptance.

The K policy (``draft_length``) for trees: maximise expected tokens per second,
E[tokens | W, D] / (t_draft(W, D) + t_round + t_verify(W * D + 1)), with
E[tokens | W, D] = 1 + sum_{d=1..D} prod_{j<=d} alpha_W(j), alpha_W(j) the measured acceptance
at depth j of trees W draws wide (shrunk towards a prior built from the narrower widths),
t_verify the measured target pass over the tree's nodes and t_draft(W, D) one draft pass per
level over the tree so far (Sequoia's size-from-cost idea on EAGLE-2's dynamic tree). Depth 0
(plain decoding) wins where speculation does not pay; width 1 is the chain.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from specsplit.engine.draft_length import CARRY, CostTable, probe_affordable
from specsplit.errors import ConfigError
from specsplit.proposers.draft_tree import TreeShape


class TreePolicy(ABC):
    """Picks a tree shape before a round and learns from its outcome."""

    @abstractmethod
    def choose(self, depth_limit: int, node_cap: int, paths: int) -> TreeShape:
        """The next round's shape: depth <= depth_limit, at most node_cap draws and paths
        root-to-leaf paths (the verifier's limits and the context room)."""

    def update(
        self,
        shape: TreeShape,
        n_accepted: int,
        t_verify: float,
        n: int,
        t_draft: float,
        t_round: float = 0.0,
        first_run: int | None = None,
    ) -> None:
        """Learn from a round: n tokens verified in t_verify seconds, n_accepted passed, the
        tree took t_draft seconds to draft, t_round went to the network and queue;
        first_run: how many levels the accepted path followed each node's first draw (what
        a chain, width 1, would have accepted), where known."""
        return None

    def new_request(self) -> None:
        """A new text begins (see DraftLengthPolicy.new_request)."""
        return None

    def drafts(self, depth_limit: int) -> bool:
        """Would the next round draft (see DraftLengthPolicy.drafts)?"""
        return depth_limit > 0


def parse_tree(text: str) -> tuple[int, int] | None:
    """``WIDTHxDEPTH`` -> (width, depth); ``auto`` -> None (the adaptive policy)."""
    if text == "auto":
        return None
    try:
        w, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"a draft tree is auto, off or WIDTHxDEPTH, got {text!r}") from None
    if not (1 <= w <= 16 and 0 <= d <= 64):
        raise ConfigError(f"a draft tree needs width in [1, 16], depth in [0, 64]: {text!r}")
    return w, d


def tree_policy(text: str, k_max: int = 16) -> TreePolicy | None:
    """The policy of ``--draft-tree``: None for off (chains), else fixed or adaptive."""
    if text == "off":
        return None
    shape = parse_tree(text)
    return AdaptiveTree(k_max) if shape is None else FixedTree(*shape)


class FixedTree(TreePolicy):
    """The same shape every round (replayable: same seed, same text)."""

    def __init__(self, width: int, depth: int) -> None:
        self.width, self.depth = width, depth

    def drafts(self, depth_limit: int) -> bool:
        return min(self.depth, depth_limit) > 0

    def choose(self, depth_limit: int, node_cap: int, paths: int) -> TreeShape:
        depth = max(0, min(self.depth, depth_limit, node_cap))
        return TreeShape(self.width, depth, max(node_cap, 0), max(paths, 1))


class AdaptiveTree(TreePolicy):
    """The shape maximising expected tokens per second under measured costs and acceptance."""

    def __init__(
        self,
        k_max: int = 16,  # (the chains' K limit in SpeculativeEngine and the faces)
        widths: tuple[int, ...] = (1, 2, 3, 4),
        prior_alpha: float = 0.7,
        prior_weight: float = 2.0,
        decay: float = 0.98,
        probe_every: int = 16,
        learn_costs: bool = True,
    ) -> None:
        self.k_max, self.widths = k_max, widths
        self.verify = CostTable()
        self.draft_per_token = 0.0  # seconds of a one-token draft pass
        self.draft_scale = 1.0  # measured / modelled drafting time (moving average)
        self.round_overhead = 0.0
        self.prior_alpha, self.prior_weight = prior_alpha, prior_weight
        self.decay, self.probe_every = decay, probe_every
        self.learn_costs = learn_costs
        self.acc = {w: np.zeros(k_max) for w in widths}  # [k_max] decayed accepted at depth
        self.prop = {w: np.zeros(k_max) for w in widths}  # [k_max] decayed reached depth
        self._since_probe = 0
        self.chosen: list[tuple[int, int]] = []
        self.catch_up_s = 0.0  # what the drafter would first read before the next draft

    def alphas(self, width: int) -> np.ndarray:
        """Per-depth acceptance [k_max] of width-``width`` trees: measured, shrunk towards
        the next narrower width's estimate lifted as if each extra draw were a fresh try."""
        narrower = [w for w in self.widths if w < width]
        if narrower:
            w0 = narrower[-1]
            base = self.alphas(w0)
            prior = 1.0 - (1.0 - base) ** ((width / w0) ** 0.5)
        else:
            a, p = self.acc[width].sum(), self.prop[width].sum()
            prior = np.full(self.k_max, (a + self.prior_alpha * self.prior_weight))
            prior /= p + self.prior_weight
        return (self.acc[width] + prior * self.prior_weight) / (
            self.prop[width] + self.prior_weight
        )

    def expected_tokens(self, width: int, depth: int) -> float:
        return 1.0 + float(np.cumprod(self.alphas(width)[:depth]).sum())

    def draft_time(self, width: int, depth: int) -> float:
        """One pass per level: the first is the one-token catch-up pass, level d >= 1 a tree
        pass over the d * width draws so far (a pass over n tokens modelled as
        (1 + (n - 1) / 8) one-token passes, scaled by what rounds measured); a chain (width
        1) is drafted by one-token passes, one per level."""
        grow = 0.0 if width == 1 else 1 / 8
        passes = 1.0 + sum(1.0 + (d * width - 1) * grow for d in range(1, depth))
        return self.draft_scale * self.draft_per_token * passes if depth else 0.0

    def rate(self, width: int, depth: int) -> float:
        cost = self.draft_time(width, depth) + self.round_overhead + self.verify(width * depth + 1)
        return self.expected_tokens(width, depth) / max(cost, 1e-9)

    def drafts(self, depth_limit: int) -> bool:
        depths = range(1, min(self.k_max, depth_limit) + 1)
        return any(self.rate(w, d) > self.rate(1, 0) for w in self.widths for d in depths)

    def choose(self, depth_limit: int, node_cap: int, paths: int) -> TreeShape:
        shapes = [(1, 0)] + [
            (w, d)
            for w in self.widths
            for d in range(1, min(self.k_max, depth_limit) + 1)
            if w * d <= node_cap
        ]
        w, d = max(shapes, key=lambda s: self.rate(*s))
        first = float(self.alphas(1)[0])  # how often a first draw passes: ranks the others
        if d == 0 and len(shapes) > 1:
            self._since_probe += 1
            if self._since_probe >= self.probe_every and probe_affordable(
                self.catch_up_s, self._since_probe, self.rate(1, 0) ** -1
            ):  # keep the estimates alive
                self._since_probe = 0
                w, d = shapes[1]
        self.chosen.append((w, d))
        return TreeShape(w, d, max(node_cap, 0), max(paths, 1), min(max(first, 0.05), 0.95))

    def update(
        self,
        shape: TreeShape,
        n_accepted: int,
        t_verify: float,
        n: int,
        t_draft: float,
        t_round: float = 0.0,
        first_run: int | None = None,
    ) -> None:
        if self.learn_costs:
            self.verify.add(n, t_verify)
            self.round_overhead = 0.8 * self.round_overhead + 0.2 * t_round
            model = self.draft_time(shape.width, shape.depth) / max(self.draft_scale, 1e-9)
            if model > 0 and t_draft > 0:
                self.draft_scale = 0.8 * self.draft_scale + 0.2 * t_draft / model
        if shape.depth > 0 and shape.width in self.acc:
            self._count(shape.width, shape.depth, n_accepted)
        # a wider tree's first draws form a chain: what it passed is width 1's acceptance
        # (else width 1 keeps its prior while wider trees are chosen, and is never tried)
        if shape.depth > 0 and shape.width > 1 and first_run is not None and 1 in self.acc:
            self._count(1, shape.depth, first_run)

    def new_request(self) -> None:
        for w in self.widths:  # (as AdaptiveK.new_request)
            self.acc[w] *= CARRY
            self.prop[w] *= CARRY

    def _count(self, width: int, depth: int, n_accepted: int) -> None:
        """Decayed counts of width's trees: depths reached and depths accepted."""
        acc, prop = self.acc[width], self.prop[width]
        acc *= self.decay
        prop *= self.decay
        prop[: min(depth, n_accepted + 1)] += 1
        acc[:n_accepted] += 1
