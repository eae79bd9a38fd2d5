"""A draft model on any backend: samples k tokens one at a time from its own logits."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from specsplit.backends.base import Backend
from specsplit.proposers.base import Draft, Proposer
from specsplit.proposers.draft_tree import TreeShape, draft_tree
from specsplit.randomness import Sequential, Uniform
from specsplit.sampling import (
    SamplingParams,
    dequantize,
    logits_to_probs,
    quantize,
    sample,
    truncate_top_m,
)


class DraftModelProposer(Proposer):
    """Autoregressive drafting with a small model; q is exactly the distribution sampled from.

    The drafter keeps one KV cache and re-synchronises it with the committed text by common
    prefix each round, so rejected draft tokens are rolled back with ``truncate``.
    """

    def __init__(self, backend: Backend, top_m: int | None = None, quantize: bool = False) -> None:
        self.backend = backend
        self.name = f"draft:{backend.name}"
        # truncate q to its top-m tokens before sampling (0 = off); a quantized q crosses the
        # network, so it keeps the top 64 unless told otherwise
        self.top_m = top_m if top_m is not None else (64 if quantize else 0)
        self.quantize = quantize  # sample from q quantized to counts / 2**16 (sent on the wire)
        self._seq = backend.new_sequence()
        self._fed: list[int] = []  # tokens in the drafter's KV cache, in order
        self.tree_seconds = 0.0  # the last tree's drafting time after the catch-up pass
        self.prefill_per_token = 0.0  # seconds per token of a catch-up over many (measured)

    def _sync(self, context: Sequence[int]) -> np.ndarray:
        """Bring the cache to context [n]; return logits [V] for the next token."""
        n = min(len(self._fed), len(context) - 1)  # always re-feed >= 1 token for fresh logits
        m = 0
        while m < n and self._fed[m] == context[m]:
            m += 1
        if m < len(self._fed):
            self.backend.truncate(self._seq, m)
            del self._fed[m:]
        new = [int(t) for t in context[m:]]
        t0 = time.perf_counter()
        logits = self.backend.prefill(self._seq, new) if len(new) > 64 else None
        if logits is None:
            logits = self.backend.forward(self._seq, new)[-1]
        if len(new) >= 32:  # (a pass over many tokens: what a long catch-up costs a token)
            per = (time.perf_counter() - t0) / len(new)
            old = self.prefill_per_token
            self.prefill_per_token = per if old == 0 else 0.7 * old + 0.3 * per
        self._fed.extend(new)
        return logits

    def catch_up_s(self, context: Sequence[int]) -> float:
        behind = len(context) - len(self._fed)  # (if the cache holds a prefix of it)
        return max(0, behind) * self.prefill_per_token

    def _q(self, logits: np.ndarray, params: SamplingParams) -> np.ndarray:
        """The exact distribution [V] a sampled token comes from after logits [V]."""
        probs = logits_to_probs(logits, params)  # [V]
        if self.quantize:
            return dequantize(*quantize(probs, self.top_m), probs.shape[-1])
        return truncate_top_m(probs, self.top_m)

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, u: Uniform) -> Draft:
        if k <= 0:
            return Draft([])
        logits = self._sync(context)  # catch-up: not part of the per-token cost
        t0 = time.perf_counter()
        tokens: list[int] = []
        q_rows: list[np.ndarray] = []
        for i in range(k):
            if params.greedy:
                tokens.append(int(np.argmax(logits)))
            else:
                q = self._q(logits, params)  # [V]
                tokens.append(sample(q, u(len(context) + i)))
                q_rows.append(q)
            if i + 1 < k:
                logits = self.backend.forward(self._seq, tokens[-1:])[-1]
                self._fed.append(tokens[-1])
        if k > 1:  # k - 1 one-token passes; the first token came with the catch-up pass
            per = (time.perf_counter() - t0) / (k - 1)
            old = self.cost_per_token
            self.cost_per_token = per if old == 0 else 0.7 * old + 0.3 * per
        return Draft(tokens, None if params.greedy else np.stack(q_rows))

    drafts_trees = True

    def propose_tree(
        self, context: Sequence[int], shape: TreeShape, params: SamplingParams, u: Uniform
    ) -> Draft:
        """A tree drafted level by level (``draft_tree``): one tree forward per level over the
        tree so far; the cache keeps only the committed text afterwards (the next round's
        catch-up feeds the accepted path)."""
        if shape.depth <= 0:
            return Draft([])
        own = getattr(self.backend, "max_tree_paths", None)  # the drafter's own tree passes
        if own is not None and own < shape.max_paths:
            shape = replace(shape, max_paths=own)
        root = self._sync(context)  # [V]
        start = len(self._fed)
        t0 = time.perf_counter()

        def forward_tree(tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
            try:
                return self.backend.forward(self._seq, tokens, parents)  # [n, V]
            finally:
                self.backend.truncate(self._seq, start)

        tree = draft_tree(
            root, forward_tree, shape, params, lambda lg: self._q(lg, params), u, len(context)
        )
        self.tree_seconds = time.perf_counter() - t0  # the levels after the first
        return Draft(tree.tokens, tree.q, tree.parents)

    prepares = True

    def prepare(self, context: Sequence[int]) -> None:
        """Prefill the prompt into the draft model's cache (the first draft then needs only
        the first token)."""
        if len(context) > 1:
            self._sync(context)

    def warm_up(self, context: Sequence[int]) -> None:
        for _ in range(2):  # the first pass allocates; the second measures
            self.propose(context, 4, SamplingParams(), Sequential(0))
            self.reset()

    def reset(self) -> None:
        self.backend.truncate(self._seq, 0)
        self._fed = []
