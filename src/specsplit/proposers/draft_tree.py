"""Drafting a token tree with one model, level by level (EAGLE-2's dynamic tree, kept exact).

Each level holds at most ``width`` draws. Before a level is drawn, its slots go to the
(node, rank) pairs of the level above with the highest *global confidence*: the node's
confidence times that of its rank-th child. Greedy (EAGLE-2): a node's children are its
draft's top tokens, distinct, and a child's confidence is the draft probability of its token
(so a node's is the product along its path). Sampled: a node given c slots draws c children
i.i.d. from its q, so the counts depend only on the levels above and on q at the node, never
on the values drawn for the children (the condition ``draw_tree`` needs for exactness); the
j-th child is tried only after the ones before it were rejected, so its confidence is
a (1 - a)^j with a = ``TreeShape.accept`` (the measured acceptance of a first draw): the
first draws always form a full-depth chain and the others branch off it. A draw that
repeats a sibling's token gets confidence 0 (it is never accepted after its twin is
rejected), so no children.

One draft-model forward per level: the tree so far, in one tree-attention pass over the
committed prefix (the backends' ``forward(seq, tokens, parents)``), gives the next-token
distribution of every node of the frontier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from specsplit.errors import ConfigError
from specsplit.randomness import Uniform
from specsplit.sampling import SamplingParams, sample


@dataclass(frozen=True)
class TreeShape:
    """The size of a one-drafter tree: ``width`` draws per level, ``depth`` levels."""

    width: int  # draws per level (1: a chain)
    depth: int  # levels (the most draft tokens one round can accept; 0: no draft)
    max_nodes: int = 1 << 30  # all draws together (the verifier's limit, the context room)
    max_paths: int = 1 << 30  # root-to-leaf paths (the llama.cpp backend holds 32)
    accept: float = 0.7  # sampled trees: how often a first draw passes (ranks the others)

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 0 or not 0 < self.accept < 1:
            raise ConfigError(f"a tree needs width >= 1 and depth >= 0, got {self}")

    @property
    def nodes(self) -> int:
        return min(self.width * self.depth, self.max_nodes)


@dataclass
class TreeDraft:
    """A drafted tree: draws in level order with parents and, where sampled, each draw's q."""

    tokens: list[int]  # [n]
    parents: list[int]  # [n] parent draw, -1 for the committed text
    q: np.ndarray | None  # [n, V] what each draw was sampled from; None = greedy (one-hot)


def _allocate(scores: np.ndarray, ranked: list[np.ndarray], slots: int, paths: int) -> list[int]:
    """Children per frontier node: the ``slots`` best (node, rank) pairs by scores[node] *
    ranked[node][rank] (ranked[node]: the node's next-token probabilities, descending), cut
    so the tree keeps at most ``paths`` leaves (``paths``: leaves the level may add)."""
    pairs = [
        (-float(scores[v] * r[m]), v, m)
        for v, r in enumerate(ranked)
        if scores[v] > 0
        for m in range(min(slots, len(r)))
    ]
    pairs.sort()
    counts = [0] * len(ranked)
    for _, v, _m in pairs[:slots]:
        # a node's first child turns it from a leaf into an inner node: no new path
        if counts[v] and paths <= 0:
            continue
        if counts[v]:
            paths -= 1
        counts[v] += 1
    return counts


def draft_tree(
    root_logits: np.ndarray,
    forward_tree: Callable[[Sequence[int], Sequence[int]], np.ndarray],
    shape: TreeShape,
    params: SamplingParams,
    q_of: Callable[[np.ndarray], np.ndarray],
    u: Uniform,
    position: int,
    leaves: int = 1,
) -> TreeDraft:
    """Draft a tree of ``shape`` after the committed text.

    root_logits [V]: the draft model's logits after the committed text; forward_tree(tokens
    [n], parents [n]) -> logits [n, V] runs the draft model over the whole tree so far on top
    of the committed text (and leaves its cache as it found it); q_of(logits [V]) -> q [V] is
    the exact distribution a sampled draw comes from. The draw at ``position + d`` (level d)
    with index j within its level uses the uniform u(position + d, j), so a fixed shape and
    seed replay. ``leaves``: paths the root already counts (1).
    """
    tokens: list[int] = []
    parents: list[int] = []
    q_rows: list[np.ndarray] = []
    frontier = [-1]  # draws whose children the next level may hold (-1: the root)
    scores = np.ones(1)  # [len(frontier)] global confidence of each frontier draw
    logits = [root_logits]  # [len(frontier)] of [V]
    n_paths = leaves
    for d in range(shape.depth):
        slots = min(shape.width, shape.nodes - len(tokens))
        if slots <= 0:
            break
        conf = [_confidence(lg, params, q_of) for lg in logits]  # [V] each
        if params.greedy:
            ranked = [np.sort(c)[::-1] for c in conf]
        else:  # the j-th draw at a node passes after j rejections
            tries = shape.accept * (1 - shape.accept) ** np.arange(shape.width)  # [W]
            ranked = [tries] * len(conf)
        counts = _allocate(scores, ranked, slots, shape.max_paths - n_paths)
        level, level_scores, slot = [], [], 0
        for v, c in enumerate(counts):
            if c == 0:
                continue
            n_paths += c - 1
            if params.greedy:
                picks = [int(x) for x in np.argsort(-conf[v], kind="stable")[:c]]
            else:
                picks = [sample(conf[v], u(position + d, slot + j)) for j in range(c)]
            seen: set[int] = set()
            for j, x in enumerate(picks):
                tokens.append(x)
                parents.append(frontier[v])
                if not params.greedy:
                    q_rows.append(conf[v])
                level.append(len(tokens) - 1)
                own = conf[v][x] if params.greedy else ranked[v][j]
                level_scores.append(0.0 if x in seen else scores[v] * own)
                seen.add(x)
            slot += c
        if d + 1 == shape.depth or len(tokens) >= shape.nodes:
            break
        out = forward_tree(tokens, parents)  # [n, V]
        frontier, scores = level, np.asarray(level_scores)
        logits = [out[i] for i in level]
    q = None if params.greedy else np.stack(q_rows) if q_rows else None
    return TreeDraft(tokens, parents, q)


def _confidence(
    logits: np.ndarray, params: SamplingParams, q_of: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """The next-token distribution [V] a node ranks (greedy: softmax at temperature 1) and,
    sampled, draws its children from (q, exactly)."""
    if params.greedy:
        z = np.exp(logits.astype(np.float64) - logits.max())
        return z / z.sum()
    return q_of(logits)
