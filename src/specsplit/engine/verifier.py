"""Where the target lives, seen from the decoding loop: a verifier of rounds for one session.

The loop (``speculative.DecodeLoop``) drafts and asks a ``Verifier`` to verify; the verifier
may be the target in this process (``LocalVerifier``), this process's batch scheduler
(``scheduler.ScheduledVerifier``), or a server across the network (the transport's gRPC
client). All keep the same per-session state (``VerifySession``) and the same protocol:

- ``open(prompt_ids, params, seed)``: the session starts; the prompt is prefilled;
- ``submit(drafts, version)``: verify drafts built on the session at ``version`` (the number
  of rounds committed so far); the answer says how many passed and the next token;
- a *pipelined* draft (``pipelined=True``) is built while the round before it is still in
  flight, assuming that round accepts every draft token. Its first token is the drafter's
  guess of that round's bonus token; it is verified only if the round was fully accepted and
  the bonus equals the guess, otherwise it is dropped and the session is unchanged.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np

from specsplit.backends.base import Backend, Tokenizer
from specsplit.engine.rounds import Round, commit, decide, plan_round
from specsplit.errors import ConfigError, StaleDraft
from specsplit.proposers.base import Draft
from specsplit.randomness import verifier_uniform
from specsplit.sampling import SamplingParams


@dataclass(frozen=True)
class Outcome:
    """A verifier's answer to one submitted round."""

    version: int  # the session's version after the round
    dropped: bool  # a pipelined draft whose assumption failed: nothing was verified
    n_accepted: int  # draft tokens accepted
    next_token: int  # the correction or bonus token (-1 if dropped)
    chain: int = 0  # the draft followed (index among the non-empty drafts sent)
    accepted: tuple[int, ...] | None = None  # the accepted ids, where the verifier says them
    t_verify: float = 0.0  # seconds of the target pass
    t_queue: float = 0.0  # seconds the round waited for its pass
    batch_size: int = 1  # sessions verified in the same target pass
    load: float = 0.0  # the verifier's expected queue wait in seconds (a load hint)


class VerifySession:
    """One user's text on the verifier: committed ids, KV cache, version, random draws.

    ``tokens`` holds every committed id; all but the last (the *pending* token) are in the
    target's KV cache once prefilled. ``seq`` is None while no cache is held (not yet
    prefilled, or evicted to free memory: it is rebuilt from ``tokens`` when needed).
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        seed: int,
        vocab: int,
        first: bool = False,
    ) -> None:
        """``first``: the prefill also decides the first new token (see ``prefill_step``)."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ConfigError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ConfigError(f"prompt token ids must be in [0, {vocab})")
        self.tokens = prompt
        self.params = params
        self.uniform = verifier_uniform(seed)  # keyed by position: replays across servers
        self.vocab = vocab
        self.seq: int | None = None
        self.cached = 0  # tokens in the KV cache
        self.version = 0
        self.last_full = False  # the last round accepted every draft token
        self.last_used = time.monotonic()
        self.lock = threading.Lock()  # tokens and version change together
        self.wants_first = first  # the prefill still owes the first new token
        self.first: int | None = None  # that token, once decided

    def snapshot(self) -> tuple[list[int], int]:
        """The committed ids and the version they belong to, read together."""
        with self.lock:
            return list(self.tokens), self.version

    @property
    def pending(self) -> int:
        return self.tokens[-1]

    def missing(self) -> int:
        """Committed tokens not yet in the KV cache (besides the pending one; the last prompt
        token too while the prefill owes the first new token)."""
        return len(self.tokens) - 1 - self.cached + int(self.wants_first)

    def prefill_step(self, target: Backend, chunk: int) -> None:
        """Bring up to ``chunk`` more committed tokens into the KV cache. Where the prefill owes
        the first new token, its last chunk takes the whole prompt and decides that token from
        the target's logits after it, as a round without drafts would (the same keyed draw),
        so the first token does not wait for a round."""
        part = self.prefill_part(target, chunk)
        if part:
            assert self.seq is not None
            self.prefilled(len(part), target.prefill(self.seq, part))

    def prefill_part(self, target: Backend, chunk: int) -> list[int]:
        """The next up to ``chunk`` committed tokens the KV cache lacks (a sequence is opened
        if none is held); once the target has them, call ``prefilled``."""
        if self.seq is None:
            self.seq, self.cached = target.new_sequence(), 0
        return self.tokens[self.cached : self.cached + min(chunk, self.missing())]

    def prefilled(self, n: int, logits: np.ndarray) -> None:
        """n more tokens are in the KV cache; logits [V] after the last of them decide the first
        new token where the prefill owes it (see ``prefill_step``)."""
        self.cached += n
        if self.wants_first and self.cached == len(self.tokens):
            rnd = plan_round(self.pending, [], self.vocab)
            verdict, _ = decide(rnd, logits[None], self.params, self.uniform, len(self.tokens))
            with self.lock:
                self.tokens.append(verdict.next_token)
                self.version += 1
            self.first, self.wants_first = verdict.next_token, False
            self.last_used = time.monotonic()

    def release(self, target: Backend) -> None:
        """Free the KV cache (the ids stay: the cache can be rebuilt)."""
        if self.seq is not None:
            target.free_sequence(self.seq)
        self.seq, self.cached = None, 0

    def plan(self, drafts: Sequence[Draft], version: int, pipelined: bool) -> Round | None:
        """The round to verify, or None if a pipelined draft is to be dropped."""
        if pipelined and version != self.version:
            return None  # drafted ahead on a round that was itself dropped: drop it too
        if version != self.version:
            raise StaleDraft(f"draft built on version {version}; the session is at {self.version}")
        if pipelined:
            live = [d for d in drafts if d.tokens]
            if len(live) != 1:
                raise ConfigError("a pipelined round carries exactly one non-empty draft")
            d = live[0]
            if d.parents is not None:
                raise ConfigError("a tree cannot be drafted ahead (its bonus has no one guess)")
            if not (self.last_full and d.tokens[0] == self.pending):
                return None
            drafts = [Draft(d.tokens[1:], None if d.q is None else d.q[1:])]
        for d in drafts:
            if any(not 0 <= t < self.vocab for t in d.tokens):
                raise ConfigError(f"draft token ids must be in [0, {self.vocab})")
        return plan_round(self.pending, drafts, self.vocab)

    def apply(self, target: Backend, rnd: Round, logits: np.ndarray) -> Outcome:
        """Decide a round from the target's logits [n, V] and commit it."""
        assert self.seq is not None
        verdict, accepted = decide(rnd, logits, self.params, self.uniform, len(self.tokens))
        commit(target, self.seq, self.cached, rnd, verdict)
        with self.lock:
            self.tokens += [*accepted, verdict.next_token]
            self.version += 1
        self.cached += 1 + len(accepted)
        self.last_full = rnd.k > 0 and verdict.n_accepted == rnd.k
        self.last_used = time.monotonic()
        return Outcome(
            self.version,
            False,
            verdict.n_accepted,
            verdict.next_token,
            verdict.chain,
            tuple(accepted),
        )

    def dropped(self) -> Outcome:
        self.last_full = False  # the guess failed; the next round must not be pipelined on it
        return Outcome(self.version, True, 0, -1)


def tree_paths(target: Backend) -> int:
    """Root-to-leaf paths a tree round may have on this target (0: no tree attention)."""
    if not target.supports_tree:
        return 0
    return int(getattr(target, "max_tree_paths", 1 << 16))


class Verifier(ABC):
    """Verifies the rounds of one session (see the module docstring)."""

    tokenizer: Tokenizer
    vocab_size: int
    n_ctx: int
    pipelines: bool = False  # worth drafting ahead while a round is in flight (a network)
    remote: bool = False  # time outside t_verify and t_queue is network time
    shares_cpus: bool = True  # the target computes on this machine's cores (local, loopback)
    max_draft: int = 1 << 30  # draft tokens one round may carry (the server's limit)
    tree_paths: int = 0  # root-to-leaf paths a one-drafter tree may have (0: no trees)
    cost_shape: dict[int, float]  # seconds of a target pass over n tokens (for choosing K)

    @abstractmethod
    def open(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int, first: bool = False
    ) -> int | None:
        """Start the session and prefill its prompt; with ``first`` (a request's start, not a
        resume) the prefill also decides the first new token, returned (the session's version
        is then 1)."""

    @abstractmethod
    def submit(
        self, drafts: Sequence[Draft], version: int, pipelined: bool = False
    ) -> Future[Outcome]:
        """Verify drafts built on the session at ``version``."""

    @abstractmethod
    def close(self) -> None:
        """End the session and free its memory (safe to call twice)."""

    def traffic(self) -> tuple[int, int]:
        """Bytes sent and received so far (0 for an in-process verifier)."""
        return 0, 0


class LocalVerifier(Verifier):
    """The target in this process, one session at a time, one pass per round."""

    def __init__(self, target: Backend) -> None:
        self.target = target
        self.tokenizer = target.tokenizer
        self.vocab_size = target.vocab_size
        self.n_ctx = target.n_ctx
        self.tree_paths = tree_paths(target)
        self.cost_shape = {}
        self.session: VerifySession | None = None

    def open(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int, first: bool = False
    ) -> int | None:
        self.close()
        s = VerifySession(prompt_ids, params, seed, self.target.vocab_size, first)
        self.session = s
        s.prefill_step(self.target, len(s.tokens))
        return s.first

    def submit(
        self, drafts: Sequence[Draft], version: int, pipelined: bool = False
    ) -> Future[Outcome]:
        s = self.session
        if s is None:
            raise ConfigError("no open session")
        fut: Future[Outcome] = Future()
        rnd = s.plan(drafts, version, pipelined)
        if rnd is None:
            fut.set_result(s.dropped())
            return fut
        assert s.seq is not None
        t0 = time.perf_counter()
        logits = self.target.forward(s.seq, rnd.tokens, rnd.parents)  # [n, V]
        t_verify = time.perf_counter() - t0
        fut.set_result(replace(s.apply(self.target, rnd, logits), t_verify=t_verify))
        return fut

    def close(self) -> None:
        if self.session is not None:
            self.session.release(self.target)
            self.session = None
