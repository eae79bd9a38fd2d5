"""Randomness keyed by position: the same draw for the same decision, however rounds fall.

Math layer: pure NumPy, no model, no I/O. Every random decision of a generation is about
one token position n of the text (prompt included): a drafter samples its token for n, the
verifier tests a draft token at n (one uniform per child tried, for several drafters) and
samples the correction or bonus token at n. Each draw comes from a counter-based stream keyed
by (seed, stream, n, slot) rather than from one generator consumed in order, so a seeded
request with a fixed K gives the same text whatever the split into rounds: in one process,
across the network with or without drafting ahead (and some drafted-ahead rounds dropped),
and after a session resumes on another server from the committed ids.

Why this stays exact: each position is decided once (accepted, corrected or bonus), by draws
keyed to that position. A key may be drawn again only where its first draw influenced no
emitted token (the draft tokens after a rejection, a dropped round drafted ahead, a round
whose verdict was lost with its server), so its value is still independent of everything
emitted, as a fresh draw would be.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

VERIFY = 0  # the verifier's stream: slot j = the j-th child tested at a position
DRAFT = 1  # drafter j's stream is DRAFT + j
SAMPLE = 1 << 20  # the verifier's slot for the correction or bonus draw at a position


class Uniform(Protocol):
    """u in [0, 1) for a decision about token ``position`` (``slot`` tells several apart)."""

    def __call__(self, position: int, slot: int = 0) -> float: ...


class Keyed:
    """Uniforms keyed by (seed, stream, position, slot): replayable in any order."""

    def __init__(self, seed: int, stream: int) -> None:
        if seed < 0 or stream < 0:
            raise ValueError("seed and stream must be >= 0")
        self.seed, self.stream = int(seed), int(stream)

    def __call__(self, position: int, slot: int = 0) -> float:
        words = np.random.SeedSequence([self.seed, self.stream, position, slot]).generate_state(
            2, np.uint32
        )
        # 53 random bits -> a double in [0, 1), as numpy's own random() makes it
        return ((int(words[0]) >> 5) * 67108864 + (int(words[1]) >> 6)) / 9007199254740992.0


class Sequential:
    """Uniforms from one generator in the order asked, keys ignored (tests, statistics)."""

    def __init__(self, rng: np.random.Generator | int | None = None) -> None:
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def __call__(self, position: int, slot: int = 0) -> float:
        return float(self.rng.random())


def verifier_uniform(seed: int) -> Keyed:
    """The verifier's draws for a request seed."""
    return Keyed(seed, VERIFY)


def drafter_uniform(seed: int, index: int = 0) -> Keyed:
    """Drafter ``index``'s draws for a request seed (several drafters draw independently)."""
    return Keyed(seed, DRAFT + index)
