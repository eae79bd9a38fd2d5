"""Statistics of one generation, counted the same way for every drafter (DESIGN.md words).

- acceptance rate: accepted draft tokens / proposed draft tokens;
- mean accepted length (tau): tokens emitted per target verification pass, counting the
  correction or bonus token (so tau >= 1);
- per-position acceptance: acceptance of the i-th draft token given the earlier ones passed;
- tokens/s: new tokens / wall time from arrival to last token, prefill included.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """Counters and timers of one request."""

    new_tokens: int = 0
    # target passes that decided tokens: verification rounds, and the prompt's prefill where
    # it gave the first token (so the target alone has exactly one pass per token)
    target_passes: int = 0
    proposed: int = 0  # draft tokens proposed (for several drafters: tree nodes tested)
    accepted: int = 0  # draft tokens accepted
    rejected_rounds: int = 0  # rounds in which a draft token was rejected (rollback + correction)
    pos_proposed: list[int] = field(default_factory=list)  # [K_max] reached position i
    pos_accepted: list[int] = field(default_factory=list)  # [K_max] accepted at position i
    draft_lengths: list[int] = field(default_factory=list)  # K of each round
    # K the policy asked of the drafter each round (an n-gram table may deliver fewer)
    draft_asked: list[int] = field(default_factory=list)
    t_prefill: float = 0.0  # seconds
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_network: float = 0.0  # round trips minus the verifier's own time (remote verifiers)
    t_queue: float = 0.0  # rounds waiting on the verifier for a batched pass
    t_first_token: float = 0.0  # arrival -> first new token
    t_total: float = 0.0  # arrival -> last new token
    seed: int = 0  # the seed that replays this run (with a fixed K)
    round_trips: int = 0  # messages answered by the verifier (rounds, dropped ones included)
    dropped: int = 0  # draft tokens drafted ahead of a round that then failed (never verified)
    reconnects: int = 0  # sessions re-opened after the verifier went away
    bytes_sent: int = 0  # to the verifier, on the wire (remote verifiers)
    bytes_received: int = 0

    def record_round(self, k: int, n_accepted: int, emitted: int, asked: int = 0) -> None:
        """One verification pass over k draft tokens (``asked``: the K asked for, >= k), of
        which n_accepted passed."""
        self.target_passes += 1
        self.draft_lengths.append(k)
        self.draft_asked.append(max(k, asked))
        self.proposed += k
        self.accepted += n_accepted
        self.rejected_rounds += int(n_accepted < k)
        while len(self.pos_proposed) < k:
            self.pos_proposed.append(0)
            self.pos_accepted.append(0)
        for i in range(min(k, n_accepted + 1)):
            self.pos_proposed[i] += 1
            self.pos_accepted[i] += int(i < n_accepted)
        self.new_tokens += emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.pos_accepted, self.pos_proposed)]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.t_total if self.t_total > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        dt = self.t_total - self.t_first_token
        return (self.new_tokens - 1) / dt if self.new_tokens > 1 and dt > 0 else 0.0

    def as_dict(self, rounds: bool = True) -> dict:
        """Every figure; ``rounds=False`` leaves out the per-round lists (K asked and given)."""
        per_round = {"draft_lengths": self.draft_lengths, "draft_asked": self.draft_asked}
        return {
            "new_tokens": self.new_tokens,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "time_to_first_token_s": self.t_first_token,
            "total_s": self.t_total,
            "prefill_s": self.t_prefill,
            "draft_s": self.t_draft,
            "verify_s": self.t_verify,
            "network_s": self.t_network,
            "queue_s": self.t_queue,
            "round_trips": self.round_trips,
            "reconnects": self.reconnects,
            "dropped_draft_tokens": self.dropped,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_per_token": (self.bytes_sent + self.bytes_received) / self.new_tokens
            if self.new_tokens
            else 0.0,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "per_position_acceptance": self.per_position_acceptance,
            "target_passes": self.target_passes,
            "rejected_rounds": self.rejected_rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
            **(per_round if rounds else {}),
            "seed": self.seed,
        }
