"""The proposer interface: given the committed text, propose up to k next tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specsplit.errors import ConfigError
from specsplit.proposers.draft_tree import TreeShape
from specsplit.randomness import Uniform
from specsplit.sampling import SamplingParams, SparseRows


@dataclass
class Draft:
    """Draft tokens and, where they were sampled, the exact distribution of each."""

    tokens: list[int]  # [k] proposed ids, k <= the k asked for
    # [k, V] what each token was sampled from (sparse rows as they come over the wire);
    # None = one-hot
    q: np.ndarray | SparseRows | None = None
    # a tree from one drafter (``draw_tree``): parent of each token among these (-1: the
    # committed text), tokens in level order; None: a chain
    parents: list[int] | None = None  # [k]


class Proposer(ABC):
    """Proposes draft tokens for the text so far (prompt + accepted tokens)."""

    name: str
    cost_per_token: float = 0.0  # seconds per one-token draft pass, measured (for choosing K)

    @abstractmethod
    def propose(self, context: Sequence[int], k: int, params: SamplingParams, u: Uniform) -> Draft:
        """Up to k tokens that may follow context [n]; sampled drafts fill Draft.q. The token
        for position n + i is sampled with the uniform u(n + i) (``randomness``)."""

    drafts_trees: bool = False  # propose_tree() implemented

    def propose_tree(
        self, context: Sequence[int], shape: TreeShape, params: SamplingParams, u: Uniform
    ) -> Draft:
        """A tree of at most ``shape`` after context [n] (Draft.parents set); the draw at
        position n + d with index j in its level uses u(n + d, j)."""
        raise ConfigError(f"the {self.name} drafter does not draft token trees")

    prepares: bool = False  # prepare() does work worth running beside the target's prefill

    def catch_up_s(self, context: Sequence[int]) -> float:
        """Seconds the next draft would spend first reading the part of context [n] this
        drafter has not seen (a prompt it did not prefill, rounds it sat out); 0: none."""
        return 0.0

    def prepare(self, context: Sequence[int]) -> None:
        """Optional: catch up on context [n] (the prompt) before the first draft."""
        return None

    def warm_up(self, context: Sequence[int]) -> None:
        """Optional: measure costs before the timed run."""
        return None

    def reset(self) -> None:
        """Forget any per-request state (caches are re-synchronised by prefix anyway)."""
        return None
