"""How one scheduler turn shares its prefill pass among the prompts waiting for one.

New sessions' prompts (and evicted sessions being rebuilt) are prefilled together, in one
batched target pass per turn: up to ``max_batch`` sessions, those that waited longest first,
each at most one chunk. While other sessions decode, the pass holds one chunk of tokens in
all for each whole share of prompts waiting per session decoding (one chunk where as many
decode as wait, so a decoding session waits for no more prefill between two of its rounds
than with one chunk of one prompt per turn; 7 chunks for 7 prompts that wait while one
session decodes: its one stall lets 7 sessions start); with nobody decoding the pass delays
no one and takes a whole chunk of each prompt. (With one chunk in all, 8 clients starting
at once on this CPU had one prompt prefilled alone, then 7 sharing 256 tokens per turn
beside the first session's rounds: their first tokens came 11-13 s after it.)

On a backend that pads a batch to its longest item (``Backend.pads_batch``: the torch
backend), a pass computes its item count times its longest item, padding included, so the
items of a pass are planned as rows of one length n (an item that misses fewer tokens is
padded): n is the first step of the cheapest plan that brings every waiting prompt in, a plan
costing the rows it computes plus ``PASS_ROWS`` for each pass (``padded_length``), within the
budget. Prompts of similar lengths then come in together in one pass and their sessions
start decoding together (with rows of the least missing length, 8 HumanEval prompts of
119-158 tokens took a pass of 8 x 118 rows, then 7 thin passes, one per scheduler turn,
while the first sessions decoded: their first tokens came ~1 s apart).
"""

from __future__ import annotations

from collections.abc import Sequence

PASS_ROWS = 32  # what a pass costs beyond its rows, in rows (the weights' read; see below)


def prefill_budget(n_sessions: int, chunk: int, decoding: int) -> int:
    """Prompt tokens one pass may carry for n sessions while ``decoding`` other sessions
    decode (see the module docstring)."""
    return chunk * max(1, n_sessions // max(1, decoding))


def prefill_shares(
    missing: Sequence[int], budget: int, cap: int, same_length: bool = False
) -> list[int]:
    """Tokens to prefill for each session, given the tokens each still misses [m]: equal shares
    of ``budget``, at most ``cap`` each; what one session does not need goes to the others, or
    with ``same_length`` (a padded pass) up to one length n each, n = ``padded_length`` within
    ``budget`` (n rows each, padding included). Every share is >= 1 where the session misses a
    token and ``budget`` >= the number of sessions."""
    if same_length and missing:
        n = min(cap, max(1, budget // len(missing)), padded_length(missing))
        return [min(m, n) for m in missing]
    out = [0] * len(missing)
    left = budget
    order = sorted(range(len(missing)), key=lambda i: missing[i])  # the smallest need first
    for j, i in enumerate(order):
        out[i] = max(0, min(missing[i], cap, left // (len(order) - j)))
        left -= out[i]
    return out


def padded_length(missing: Sequence[int], pass_rows: int = PASS_ROWS) -> int:
    """The first pass's row length in the cheapest plan of padded passes that prefills every
    prompt: a plan is a rising sequence of levels l_1 < ... < l_p = max(missing); its pass j
    computes (prompts missing more than l_(j-1)) x (l_j - l_(j-1)) rows, and each pass costs
    ``pass_rows`` more (on this CPU a bfloat16 pass of one token costs what ~50 more rows do,
    a float32 one ~11: the weights are read once per pass). O(m^2) over the distinct levels.

    >>> padded_length([7, 7, 7, 11, 11])  # one pass of 5 x 11 rows: 55 + 32 against 35 + 8 + 64
    11
    >>> padded_length([5, 250])  # 10 + 245 rows in two passes beat 500 in one
    5
    """
    levels = [0, *sorted({m for m in missing if m > 0})]  # 0: nothing prefilled yet
    if len(levels) == 1:
        return 0
    above = [sum(1 for m in missing if m > lv) for lv in levels]  # prompts beyond each level
    # best[i]: (the least cost of bringing every prompt from level i to the top, the level
    # of that plan's first pass); filled from the top down
    best = [(0, levels[-1])] * len(levels)
    for i in range(len(levels) - 2, -1, -1):
        best[i] = min(
            (
                (above[i] * (levels[j] - levels[i]) + pass_rows + best[j][0], levels[j])
                for j in range(i + 1, len(levels))
            ),
            key=lambda o: (o[0], -o[1]),  # ties: fewer, longer passes
        )
    return best[0][1]
