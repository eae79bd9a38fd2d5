"""One verification round, in three steps any verifier shares (local, batched, remote).

1. ``plan_round``: the tokens one target pass must see: [pending, d_1 .. d_K] for one chain,
   or [pending, tree nodes...] with parents for several chains or one drafter's tree
   (SpecInfer; ``draw_tree``);
2. the target pass itself (``Backend.forward`` or one ``forward_batch`` for many sessions);
3. ``decide``: the verdict from the pass's logits (greedy or rejection sampling), then
   ``commit``: roll the KV cache back to the accepted tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specsplit.backends.base import Backend
from specsplit.draw_tree import DrawTree, verify_draw_tree, verify_draw_tree_greedy
from specsplit.errors import ConfigError
from specsplit.proposers.base import Draft
from specsplit.randomness import Uniform
from specsplit.sampling import SamplingParams, SparseRows, logits_to_probs
from specsplit.verify import (
    TokenTree,
    Verdict,
    verify_chain,
    verify_greedy,
    verify_tree,
    verify_tree_greedy,
)


@dataclass(frozen=True)
class Round:
    """What one target pass verifies: the pending token followed by the drafts."""

    chains: list[list[int]]  # the non-empty draft chains
    qs: list[np.ndarray | None]  # per chain, [K_j, V_target] or None (one-hot)
    tree: TokenTree | None  # None: at most one chain
    tokens: list[int]  # [n] fed to the target, pending first
    parents: list[int] | None  # [n] tree parents among the new tokens; None: a chain
    draws: DrawTree | None = None  # a one-drafter tree (then chains/qs hold its draws)

    @property
    def n_draft(self) -> int:
        """Draft tokens proposed (tree nodes tested, for several chains)."""
        return len(self.tokens) - 1

    @property
    def k(self) -> int:
        """The longest chain (a one-drafter tree: its depth)."""
        if self.draws is not None:
            return self.draws.depth()
        return max((len(c) for c in self.chains), default=0)


def align_q(q: np.ndarray | SparseRows | None, vocab: int) -> np.ndarray | None:
    """A drafter's q [k, V_draft] as [k, V_target] (padding rows of the logits differ); a
    q from the wire (``SparseRows``) made dense."""
    if isinstance(q, SparseRows):
        q = q.dense()
    if q is None or q.shape[1] == vocab:
        return q
    if q.shape[1] < vocab:
        return np.pad(q, ((0, 0), (0, vocab - q.shape[1])))
    if q[:, vocab:].any():
        raise ConfigError("the drafter proposed ids outside the target's vocabulary")
    return q[:, :vocab]


def fit_round(drafts: Sequence[Draft], cap: int) -> list[Draft]:
    """Drafts cut to at most cap draft tokens in all (the longest chain loses its last token
    first): what one round may hold in the verifier's limit and the context left. Cutting a
    chain's tail keeps it an exact draft."""
    cap = max(cap, 0)
    if any(d.parents is not None for d in drafts):
        return [_fit_tree(d, cap) if d.parents is not None else d for d in drafts]
    out = [Draft(list(d.tokens), d.q) for d in drafts]
    while sum(len(d.tokens) for d in out) > cap:
        j = max(range(len(out)), key=lambda i: len(out[i].tokens))
        d = out[j]
        out[j] = Draft(d.tokens[:-1], None if d.q is None else d.q[: len(d.tokens) - 1])
    return out


def _fit_tree(d: Draft, cap: int) -> Draft:
    """A tree cut to at most cap draws by dropping its deepest levels whole: a level's shape
    never depends on the levels below, so what is left is an exact tree."""
    assert d.parents is not None
    depth: list[int] = []
    for p in d.parents:
        depth.append(1 + (depth[p] if p >= 0 else 0))
    keep = len(depth)
    while keep > cap:
        keep = depth.index(depth[keep - 1])  # the deepest level starts here (level order)
    if keep == len(depth):
        return d
    q = None if d.q is None else d.q[:keep]
    return Draft(list(d.tokens[:keep]), q, list(d.parents[:keep]))


def plan_round(pending: int, drafts: Sequence[Draft], vocab: int) -> Round:
    """The target input of a round over the drafts (empty drafts: one plain decoding step)."""
    live = [d for d in drafts if d.tokens]
    if any(d.parents is not None for d in live):
        if len(live) != 1:
            raise ConfigError("a one-drafter tree is verified alone, not beside other drafts")
        return _plan_tree(pending, live[0], vocab)
    chains = [[int(t) for t in d.tokens] for d in live]
    qs = [align_q(d.q, vocab) for d in live]
    for c, q in zip(chains, qs, strict=True):
        if q is not None and q.shape[0] < len(c):
            raise ConfigError(f"a draft of {len(c)} tokens came with {q.shape[0]} q rows")
    if len(chains) <= 1:
        return Round(chains, qs, None, [pending, *(chains[0] if chains else [])], None)
    tree = TokenTree.from_chains(chains)
    parents = [-1] + [p + 1 for p in tree.parents]  # node i is new token 1 + i
    return Round(chains, qs, tree, [pending, *tree.tokens], parents)


def _plan_tree(pending: int, d: Draft, vocab: int) -> Round:
    assert d.parents is not None
    draws = DrawTree.build([int(t) for t in d.tokens], d.parents)
    q = align_q(d.q, vocab)
    if q is not None and q.shape[0] != len(d.tokens):
        raise ConfigError(f"a tree of {len(d.tokens)} draws came with {q.shape[0]} q rows")
    parents = [-1] + [p + 1 for p in draws.tree.parents]  # node i is new token 1 + i
    return Round(
        [list(draws.tokens)], [q], draws.tree, [pending, *draws.tree.tokens], parents, draws
    )


def decide(
    rnd: Round, logits: np.ndarray, params: SamplingParams, u: Uniform, base: int
) -> tuple[Verdict, list[int]]:
    """The verdict from the target's logits [n, V] over rnd.tokens, and the accepted ids;
    base is the position of the round's first draft token (the committed length)."""
    if rnd.draws is not None:
        if params.greedy:
            v = verify_draw_tree_greedy(rnd.draws, np.argmax(logits, axis=-1))
        else:
            p = logits_to_probs(logits, params)  # [n, V]
            v = verify_draw_tree(rnd.draws, rnd.qs[0], p, u, base)
        return v, [rnd.draws.tree.tokens[i] for i in v.path]
    if rnd.tree is None:
        chain = rnd.chains[0] if rnd.chains else []
        if params.greedy:
            v = verify_greedy(chain, np.argmax(logits, axis=-1))
        else:
            q = rnd.qs[0] if rnd.qs else None
            v = verify_chain(chain, q, logits_to_probs(logits, params), u, base)
        return v, list(chain[: v.n_accepted])
    if params.greedy:
        v = verify_tree_greedy(rnd.chains, rnd.tree, np.argmax(logits, axis=-1))
    else:
        v = verify_tree(rnd.chains, rnd.qs, rnd.tree, logits_to_probs(logits, params), u, base)
    return v, [rnd.tree.tokens[i] for i in v.path]


def commit(target: Backend, seq: int, base: int, rnd: Round, verdict: Verdict) -> None:
    """Keep the pending token and the accepted draft tokens in the cache; drop the rest."""
    if rnd.tree is None:
        target.truncate(seq, base + 1 + verdict.n_accepted)
    else:
        target.keep(seq, base, [0] + [1 + i for i in verdict.path])
