"""The speculation loop for one request: draft, verify in one target pass, roll back, repeat.

The target's KV cache holds every committed token except the last one (``pending``); a round
feeds [pending, d_1 .. d_K] in one pass, which yields the K + 1 distributions verification
needs, then truncates the cache to the accepted tokens. With no drafter (or K = 0) a round
is one step of plain KV-cached decoding, so the baseline runs through the same code.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from specsplit.backends.base import Backend
from specsplit.engine.draft_length import AdaptiveK, DraftLengthPolicy, FixedK
from specsplit.engine.metrics import GenerationStats
from specsplit.engine.stopping import TextStream
from specsplit.errors import ConfigError
from specsplit.proposers.base import Draft, Proposer
from specsplit.sampling import GREEDY, SamplingParams, logits_to_probs
from specsplit.verify import (
    TokenTree,
    Verdict,
    verify_chain,
    verify_greedy,
    verify_tree,
    verify_tree_greedy,
)


@dataclass(frozen=True)
class GenerationRequest:
    """One request: prompt ids and how to continue them."""

    prompt_ids: Sequence[int]  # [n] token ids, templates already applied
    max_new_tokens: int = 128
    params: SamplingParams = GREEDY
    seed: int | None = None  # None: a fresh random seed, reported in the stats
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one


@dataclass
class GenerationResult:
    """What a request produced."""

    token_ids: list[int]  # new ids (EOS not included)
    text: str
    finish_reason: str  # "length", "stop" or "eos"
    stats: GenerationStats


@dataclass
class Chunk:
    """A streamed piece: new text and ids; the last chunk carries the result."""

    text: str
    token_ids: list[int]
    result: GenerationResult | None = field(default=None)


class SpeculativeEngine:
    """Speculative decoding of one request at a time on a target backend."""

    def __init__(
        self,
        target: Backend,
        proposers: Sequence[Proposer] = (),
        k: int | None = None,
        k_max: int = 16,
        policy: DraftLengthPolicy | None = None,
    ) -> None:
        if len(proposers) > 1 and not target.supports_tree:
            raise ConfigError(f"several drafters need tree verification; {target.name} has none")
        if k is not None and not 0 <= k <= 64:
            raise ConfigError(f"k must be in [0, 64] or auto, got {k}")
        self.target = target
        self.proposers = list(proposers)
        self.policy: DraftLengthPolicy = policy or (
            FixedK(0) if not proposers else FixedK(k) if k is not None else AdaptiveK(k_max)
        )

    # ---- set-up ----

    def warm_up(self, prompt_ids: Sequence[int] = ()) -> None:
        """Run each model once and measure target pass costs for the K policy (untimed)."""
        ids = list(prompt_ids) or [self.target.tokenizer.bos_token_id or 0] * 32
        seq = self.target.new_sequence()
        try:
            self.target.prefill(seq, ids)
            base = self.target.length(seq)
            for n in (1, 2, 3, 5, 9, 13, 17):
                times = []
                for _ in range(3):  # median of three: the first pass of a shape allocates
                    t0 = time.perf_counter()
                    self.target.forward(seq, (ids * n)[:n])
                    times.append(time.perf_counter() - t0)
                    self.target.truncate(seq, base)
                if isinstance(self.policy, AdaptiveK):
                    self.policy.verify.shape[n] = sorted(times)[1]
        finally:
            self.target.free_sequence(seq)
        for p in self.proposers:
            p.warm_up(ids)
        if isinstance(self.policy, AdaptiveK):
            self.policy.draft_per_token = sum(p.cost_per_token for p in self.proposers)

    # ---- one round ----

    def _align(self, q: np.ndarray | None) -> np.ndarray | None:
        """A drafter's q [k, V_draft] as [k, V_target] (padding rows of the logits differ)."""
        v = self.target.vocab_size
        if q is None or q.shape[1] == v:
            return q
        if q.shape[1] < v:
            return np.pad(q, ((0, 0), (0, v - q.shape[1])))
        if q[:, v:].any():
            raise ConfigError("the drafter proposed ids outside the target's vocabulary")
        return q[:, :v]

    def _verify(
        self, seq: int, pending: int, drafts: list[Draft], params: SamplingParams, rng
    ) -> tuple[Verdict, list[int]]:
        """One target pass over [pending] + drafts; returns the verdict and accepted ids."""
        base = self.target.length(seq)
        chains = [d.tokens for d in drafts if d.tokens]
        if len(chains) <= 1:
            chain = chains[0] if chains else []
            logits = self.target.forward(seq, [pending, *chain])  # [K+1, V]
            if params.greedy:
                v = verify_greedy(chain, np.argmax(logits, axis=-1))
            else:
                q = self._align(next((d.q for d in drafts if d.tokens), None))
                v = verify_chain(chain, q, logits_to_probs(logits, params), rng)
            self.target.truncate(seq, base + 1 + v.n_accepted)
            return v, list(chain[: v.n_accepted])
        qs = [self._align(d.q) for d in drafts if d.tokens]
        tree = TokenTree.from_chains(chains)
        parents = [-1] + [p + 1 for p in tree.parents]  # node i is new token 1 + i
        logits = self.target.forward(seq, [pending, *tree.tokens], parents)  # [n+1, V]
        if params.greedy:
            v = verify_tree_greedy(chains, tree, np.argmax(logits, axis=-1))
        else:
            v = verify_tree(chains, qs, tree, logits_to_probs(logits, params), rng)
        self.target.keep(seq, base, [0] + [1 + i for i in v.path])
        return v, [tree.tokens[i] for i in v.path]

    # ---- the loop ----

    def stream(self, req: GenerationRequest) -> Iterator[Chunk]:
        """Generate, yielding text as it is accepted; the last chunk carries the result."""
        t_arrival = time.perf_counter()
        prompt = [int(t) for t in req.prompt_ids]
        self._check(req, prompt)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        rng_verify, rng_draft = (
            np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)
        )
        stats = GenerationStats(seed=seed)
        text = TextStream(self.target.tokenizer, req.stop)
        eos = self.target.tokenizer.eos_token_ids
        out: list[int] = []
        finish = None
        seq = self.target.new_sequence()
        try:
            t0 = time.perf_counter()
            if len(prompt) > 1:
                self.target.prefill(seq, prompt[:-1])
            stats.t_prefill = time.perf_counter() - t0
            context, pending = list(prompt), prompt[-1]
            while finish is None:
                budget = req.max_new_tokens - len(out)
                room = self.target.n_ctx - len(context)
                k = self.policy.choose(min(budget, room) - 1)
                t0 = time.perf_counter()
                drafts = (
                    [p.propose(context, k, req.params, rng_draft) for p in self.proposers]
                    if k
                    else []
                )
                t1 = time.perf_counter()
                verdict, accepted = self._verify(seq, pending, drafts, req.params, rng_verify)
                t2 = time.perf_counter()
                k_used = max((len(d.tokens) for d in drafts), default=0)
                self.policy.update(
                    k_used,
                    verdict.n_accepted,
                    t2 - t1,
                    1 + sum(len(d.tokens) for d in drafts),
                    sum(p.cost_per_token for p in self.proposers),
                )
                stats.t_draft += t1 - t0
                stats.t_verify += t2 - t1
                new, finish = self._cut([*accepted, verdict.next_token], budget, eos)
                stats.record_round(k_used, verdict.n_accepted, len(new) + (finish == "eos"))
                out += new
                context += new
                pending = context[-1]
                cut = text.find_stop(out)
                if cut is not None:
                    new = new[: max(0, len(new) - (len(out) - cut))]
                    out, finish = out[:cut], "stop"
                if finish is None and len(context) >= self.target.n_ctx:
                    finish = "length"
                if not stats.t_first_token:
                    stats.t_first_token = time.perf_counter() - t_arrival
                piece = text.update(out, final=finish is not None)
                if finish is None:
                    yield Chunk(piece, new)
            stats.t_total = time.perf_counter() - t_arrival
            result = GenerationResult(out, text.emitted, finish, stats)
            yield Chunk(piece, new, result)
        finally:
            self.target.free_sequence(seq)

    def generate(self, req: GenerationRequest) -> GenerationResult:
        """Generate to the end; returns the result."""
        for chunk in self.stream(req):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("stream ended without a result")

    # ---- helpers ----

    def _check(self, req: GenerationRequest, prompt: list[int]) -> None:
        if not prompt:
            raise ConfigError("the prompt is empty")
        if req.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if len(prompt) >= self.target.n_ctx:
            raise ConfigError(
                f"the prompt has {len(prompt)} tokens; the target's context holds {self.target.n_ctx}"
            )
        v = self.target.vocab_size
        if min(prompt) < 0 or max(prompt) >= v:
            raise ConfigError(f"prompt token ids must be in [0, {v})")

    @staticmethod
    def _cut(new: list[int], budget: int, eos: frozenset[int]) -> tuple[list[int], str | None]:
        """Cut a round's tokens at EOS (not kept) and at the token budget."""
        for i, t in enumerate(new[:budget]):
            if t in eos:
                return new[:i], "eos"
        if len(new) >= budget:
            return new[:budget], "length"
        return new, None
