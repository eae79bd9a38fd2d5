"""Choosing the draft length K per round from measured costs and acceptance (DESIGN.md).

Maximise expected tokens per second: E[tokens | K] / (t_draft(K) + t_round + t_verify(K + 1)),
where t_round is the fixed cost of a round outside the target pass (network round trip and
queue wait; 0 on one machine), and
E[tokens | K] = 1 + sum_{i=1..K} prod_{j<=i} alpha_j with alpha_j the measured per-position
acceptance, t_verify(n) the measured cost of a target pass over n tokens and t_draft(K) the
measured cost of drafting K tokens. K = 0 (plain decoding) wins where speculation does not pay.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class DraftLengthPolicy(ABC):
    """Picks K before a round and learns from its outcome."""

    @abstractmethod
    def choose(self, limit: int) -> int:
        """K for the next round, at most limit."""

    def update(
        self,
        k: int,
        n_accepted: int,
        t_verify: float,
        n: int,
        draft_per_token: float,
        t_round: float = 0.0,
    ) -> None:
        """Learn from a round: k drafted, n_accepted passed, n tokens verified in t_verify
        seconds; drafting costs draft_per_token seconds per token as the drafters measure it;
        t_round seconds went to the network and the verifier's queue."""
        return None

    def new_request(self) -> None:
        """A new text begins (not a resumed one): adaptive policies weigh what they learnt
        from earlier texts less, since acceptance depends on the text (code against chat)."""
        return None

    def drafts(self, limit: int) -> bool:
        """Would the next round draft, as the policy stands (probes aside)? If not, the loop
        leaves the drafters' prompt prefill until they first draft: they catch up then."""
        return limit > 0


CARRY = 0.1  # the weight earlier requests' acceptance counts keep when a new one begins
# a probe (K > 0 while K = 0 wins) waits until its drafters' catch-up (a prompt they did not
# prefill, the rounds they sat out) costs at most this share of the plain rounds since the
# last probe: a 0.5B drafter reading an 800-token prompt it skipped takes seconds
PROBE_CATCH_UP = 0.25


def probe_affordable(catch_up_s: float, rounds: int, round_s: float) -> bool:
    """Is a probe's catch-up (seconds) within PROBE_CATCH_UP of ``rounds`` plain rounds?"""
    return catch_up_s <= PROBE_CATCH_UP * rounds * round_s


class FixedK(DraftLengthPolicy):
    """The same K every round (replayable: same seed, same text)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def choose(self, limit: int) -> int:
        return max(0, min(self.k, limit))

    def drafts(self, limit: int) -> bool:
        return self.choose(limit) > 0


class CostTable:
    """Seconds per target pass over n tokens: a measured shape c(n) times one live scale.

    The first measurement of each n sets its shape (warm-up calibrates it); later ones move
    a scale shared by every n, so noise or a growing context shifts all costs together and
    the comparison between draft lengths stays sound. The shape keeps learning too, more
    slowly (``learn``), so a calibration taken in a noisy moment or at another context does
    not fix it for good: at the fixed point every measured n is predicted as measured.
    """

    def __init__(self, decay: float = 0.8, learn: float = 0.1) -> None:
        self.decay, self.learn = decay, learn
        self.shape: dict[int, float] = {}  # n -> seconds at scale 1
        self.scale = 1.0

    def add(self, n: int, seconds: float) -> None:
        if n not in self.shape:
            self.shape[n] = seconds / self.scale
            return
        ratio = seconds / self.shape[n]
        self.scale = self.decay * self.scale + (1 - self.decay) * ratio
        self.shape[n] += self.learn * (seconds / self.scale - self.shape[n])

    def _shape(self, n: int) -> float:
        xs = sorted(self.shape)
        if not xs:
            return float(n)  # nothing measured: proportional to n
        if len(xs) == 1:
            return self.shape[xs[0]] * max(n, 1) / max(xs[0], 1)
        if n <= xs[0]:
            return self.shape[xs[0]]
        if n >= xs[-1]:  # extrapolate with the slope of the last two points
            a, b = xs[-2], xs[-1]
            slope = max((self.shape[b] - self.shape[a]) / (b - a), 0.0)
            return self.shape[b] + slope * (n - b)
        return float(np.interp(n, xs, [self.shape[x] for x in xs]))

    def __call__(self, n: int) -> float:
        return self.scale * self._shape(n)


class AdaptiveK(DraftLengthPolicy):
    """K maximising expected tokens per second under measured costs and acceptance."""

    def __init__(
        self,
        k_max: int = 12,
        prior_alpha: float = 0.7,
        prior_weight: float = 2.0,
        decay: float = 0.98,
        probe_every: int = 16,
        learn_costs: bool = True,
        probe_margin: float = 1.25,
    ) -> None:
        self.k_max = k_max
        self.verify = CostTable()
        self.draft_per_token = 0.0  # seconds per draft token (moving average)
        self.round_overhead = 0.0  # seconds per round outside the target pass (moving average)
        self.prior_alpha, self.prior_weight = prior_alpha, prior_weight
        self.decay = decay  # forget old rounds slowly: acceptance drifts with the text
        self.probe_every = probe_every  # with K = 0 chosen, still probe K = 2 this often
        self.acc = np.zeros(k_max)  # [k_max] decayed accepted counts at position i
        self.prop = np.zeros(k_max)  # [k_max] decayed proposed counts at position i
        self._since_probe = 0
        self.probe_margin = probe_margin
        self.learn_costs = learn_costs  # False: keep the costs set by hand (tests, replays)
        self.chosen: list[int] = []
        self.catch_up_s = 0.0  # what the drafters would first read before the next draft

    def alphas(self) -> np.ndarray:
        """Per-position acceptance estimates [k_max], shrunk towards the overall rate."""
        overall = (self.acc.sum() + self.prior_alpha * self.prior_weight) / (
            self.prop.sum() + self.prior_weight
        )
        return (self.acc + overall * self.prior_weight) / (self.prop + self.prior_weight)

    def expected_tokens(self, k: int) -> float:
        return 1.0 + float(np.cumprod(self.alphas()[:k]).sum())

    def rate(self, k: int) -> float:
        """Expected tokens per second with draft length k."""
        cost = self.draft_per_token * k + self.round_overhead + self.verify(k + 1)
        return self.expected_tokens(k) / max(cost, 1e-9)

    def new_request(self) -> None:
        self.acc *= CARRY
        self.prop *= CARRY

    def p_full(self, k: int) -> float:
        """Probability that all of k draft tokens pass."""
        return float(np.prod(self.alphas()[:k]))

    def _could_pay(self, ks: range) -> bool:
        """Would some K > 0 clearly beat K = 0 if every draft token were accepted? If not,
        probing cannot pay for itself (a drafter must also catch up on the text it skipped)."""
        best = max(
            (k + 1) / (self.draft_per_token * k + self.round_overhead + self.verify(k + 1))
            for k in ks
        )
        return best > self.probe_margin * self.rate(0)

    def drafts(self, limit: int) -> bool:
        return max(self._ks(limit), key=self.rate) > 0

    def _ks(self, limit: int) -> range:
        return range(0, max(0, min(self.k_max, limit)) + 1)

    def choose(self, limit: int) -> int:
        ks = self._ks(limit)
        k = max(ks, key=self.rate)
        if k == 0 and limit >= 2 and self._could_pay(ks):
            self._since_probe += 1
            if self._since_probe >= self.probe_every and probe_affordable(
                self.catch_up_s, self._since_probe, self.verify(1) + self.round_overhead
            ):  # keep the estimates alive
                self._since_probe = 0
                k = 2
        self.chosen.append(k)
        return k

    def update(
        self,
        k: int,
        n_accepted: int,
        t_verify: float,
        n: int,
        draft_per_token: float,
        t_round: float = 0.0,
    ) -> None:
        if self.learn_costs:
            self.verify.add(n, t_verify)
            if draft_per_token > 0:
                self.draft_per_token = draft_per_token
            self.round_overhead = 0.8 * self.round_overhead + 0.2 * t_round
        if k > 0:
            self.acc *= self.decay
            self.prop *= self.decay
            reached = min(k, n_accepted + 1)
            self.prop[:reached] += 1
            self.acc[:n_accepted] += 1
