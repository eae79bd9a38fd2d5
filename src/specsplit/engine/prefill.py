"""How one scheduler turn shares its prefill pass among the prompts waiting for one.

New sessions' prompts (and evicted sessions being rebuilt) are prefilled together, in one
batched target pass per turn: up to ``max_batch`` sessions, those that waited longest first,
each at most one chunk. While other sessions decode, the pass holds at most one chunk of
tokens in all, shared out evenly, so a decoding session waits for no more prefill between
two of its rounds than with one chunk of one prompt per turn; with nobody decoding the pass
delays no one and takes a whole chunk of each prompt.

On a backend that pads a batch to its longest item (``Backend.pads_batch``: the torch
backend), a pass costs its item count times its longest item, so every item of a pass gets the
same number of tokens (the least any of them misses, within the budget): no padding is computed;
the prompts with more to go carry on in the next pass.
"""

from __future__ import annotations

from collections.abc import Sequence


def prefill_budget(n_sessions: int, chunk: int, others_decoding: bool) -> int:
    """Prompt tokens one pass may carry for n sessions (see the module docstring)."""
    return chunk if others_decoding else chunk * n_sessions


def prefill_shares(
    missing: Sequence[int], budget: int, cap: int, same_length: bool = False
) -> list[int]:
    """Tokens to prefill for each session, given the tokens each still misses [m]: equal shares
    of ``budget``, at most ``cap`` each; what one session does not need goes to the others, or
    with ``same_length`` (a padded pass) every share is the least one (no padding). Every share
    is >= 1 where the session misses a token and ``budget`` >= the number of sessions."""
    if same_length and missing:
        return [max(0, min(cap, budget // len(missing), *missing))] * len(missing)
    out = [0] * len(missing)
    left = budget
    order = sorted(range(len(missing)), key=lambda i: missing[i])  # the smallest need first
    for j, i in enumerate(order):
        out[i] = max(0, min(missing[i], cap, left // (len(order) - j)))
        left -= out[i]
    return out
