"""N-gram prompt lookup (Saxena 2023, "Prompt Lookup Decoding"): no model.

Find the most recent earlier occurrence of the text's last n tokens (n from max_ngram down
to min_ngram) and propose the tokens that followed it. Deterministic, so q is one-hot.
"""

from __future__ import annotations

from collections.abc import Sequence

from specsplit.proposers.base import Draft, Proposer
from specsplit.randomness import Uniform
from specsplit.sampling import SamplingParams


class NGramProposer(Proposer):
    """Prompt lookup with an incremental index of n-gram -> latest end position."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._seen: list[int] = []  # the context the index describes
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> position right after it

    def _sync(self, context: Sequence[int]) -> None:
        """Extend the index to context; rebuild it if context is not an extension."""
        n_old = len(self._seen)
        if len(context) < n_old or list(context[:n_old]) != self._seen:
            self._seen, self._index, n_old = [], {}, 0
        self._seen.extend(int(t) for t in context[n_old:])
        seen = self._seen
        # index every n-gram ending before the last token (the last one is the query)
        for end in range(max(n_old - 1, 1), len(seen)):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n >= 0:
                    self._index[tuple(seen[end - n : end])] = end

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, u: Uniform) -> Draft:
        if k <= 0 or not context:
            return Draft([])
        self._sync(context)
        seen = self._seen
        for n in range(min(self.max_ngram, len(seen) - 1), self.min_ngram - 1, -1):
            start = self._index.get(tuple(seen[len(seen) - n :]))
            if start is not None:
                return Draft(seen[start : start + k])
        return Draft([])

    def reset(self) -> None:
        self._seen, self._index = [], {}
