"""The speculation loop for one request: draft, verify in one target pass, roll back, repeat.

``DecodeLoop`` drafts locally and hands each round to a ``Verifier`` (the target in this
process, this process's batch scheduler, or a server across the network). The verifier's
KV cache holds every committed token except the last one (``pending``); a round feeds
[pending, d_1 .. d_K] in one pass, which yields the K + 1 distributions verification needs,
then keeps the accepted tokens. With no drafter (or K = 0) a round is one step of plain
KV-cached decoding, so the baseline runs through the same code. ``SpeculativeEngine`` is
the loop on a local target.

Across a network the loop drafts ahead: while round r is in flight it drafts round r + 1 on
the assumption that r accepts everything (its first token is the guess of r's bonus token)
and sends it at once; the verifier drops it if the assumption fails (see ``verifier``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass, field

from specsplit.backends.base import Backend, Tokenizer
from specsplit.engine.draft_length import AdaptiveK, DraftLengthPolicy, FixedK
from specsplit.engine.metrics import GenerationStats
from specsplit.engine.rounds import fit_round
from specsplit.engine.stopping import TextStream
from specsplit.engine.tree_policy import AdaptiveTree, TreePolicy
from specsplit.engine.verifier import LocalVerifier, Outcome, Verifier
from specsplit.errors import ConfigError, Interrupted, SessionGone, VerifierUnavailable
from specsplit.proposers.base import Draft, Proposer
from specsplit.proposers.draft_tree import TreeShape
from specsplit.randomness import Uniform, drafter_uniform
from specsplit.sampling import GREEDY, SamplingParams

PIPELINE_MIN_P_FULL = 0.5  # draft ahead only if the round in flight likely passes whole
# Drafting ahead overlaps the verifier's pass; where both share the CPU (loopback on a small
# machine) that slows drafting down. Stop drafting ahead when a token drafted during a pass
# costs this many times one drafted between passes (re-tried every PIPELINE_RETRY rounds).
PIPELINE_MAX_SLOWDOWN = 1.5
PIPELINE_RETRY = 32


@dataclass(frozen=True)
class GenerationRequest:
    """One request: prompt ids and how to continue them."""

    prompt_ids: Sequence[int]  # [n] token ids, templates already applied
    max_new_tokens: int = 128
    params: SamplingParams = GREEDY
    seed: int | None = None  # None: a fresh random seed, reported in the stats
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one
    # output already generated for this request (a resume elsewhere after a failure): it
    # counts towards max_new_tokens and stop strings, and the result's ids include it
    resume_ids: tuple[int, ...] = ()


@dataclass
class GenerationResult:
    """What a request produced."""

    token_ids: list[int]  # new ids (EOS not included)
    text: str
    finish_reason: str  # "length", "stop" or "eos"
    stats: GenerationStats


@dataclass
class Chunk:
    """A streamed piece: new text and ids; the last chunk carries the result.

    origins[i] says how token_ids[i] came: "accepted:<drafter>" (a draft token the target
    accepted), "correction" (the target's token after a rejection), "bonus" (the target's
    token after every draft token passed) or "target" (a round without drafts).

    stats is the request's statistics so far (the loop's own object: read it before asking
    for the next chunk), so a stream can show acceptance and tau as it goes."""

    text: str
    token_ids: list[int]
    result: GenerationResult | None = field(default=None)
    origins: list[str] = field(default_factory=list)
    stats: GenerationStats | None = field(default=None)


def default_policy(proposers: Sequence[Proposer], k: int | None, k_max: int) -> DraftLengthPolicy:
    """No drafter: K = 0; a fixed k; else the adaptive policy."""
    if not proposers:
        return FixedK(0)
    return FixedK(k) if k is not None else AdaptiveK(k_max)


@dataclass
class _InFlight:
    """A submitted round the loop has not read yet."""

    future: Future[Outcome]
    drafts: list[Draft]
    t_sent: float
    pipelined: bool = False
    shape: TreeShape | None = None  # a one-drafter tree round: its shape
    t_draft: float = 0.0  # seconds drafting the tree took
    asked: int = 0  # draft tokens the policy asked for (a tree: its depth; may get fewer)


class _Run:
    """One request's text as the loop commits it: ids, stop strings, EOS, the budget."""

    def __init__(
        self, req: GenerationRequest, tokenizer: Tokenizer, stats: GenerationStats, t0: float
    ) -> None:
        self.req, self.stats, self.t0 = req, stats, t0
        self.text = TextStream(tokenizer, req.stop)
        self.eos = tokenizer.eos_token_ids
        self.out: list[int] = []  # generated ids (resume ids included)
        self.context: list[int] = []  # prompt + out
        self.n_ctx = 0
        self.finish: str | None = None
        self.piece, self.new, self.origins = "", [], []

    def take(
        self, tokens: list[int], origins: list[str], k: int, n_accepted: int, asked: int = 0
    ) -> Chunk | None:
        """Commit a round's tokens (cut at EOS, the budget, a stop string, the context); the
        chunk to stream, or None once the request has finished (see ``last``)."""
        budget = self.req.max_new_tokens - len(self.out)
        new, self.finish = DecodeLoop._cut(tokens, budget, self.eos)
        self.stats.record_round(k, n_accepted, len(new) + (self.finish == "eos"), asked)
        self.out += new
        self.context += new
        cut = self.text.find_stop(self.out)
        if cut is not None:
            new = new[: max(0, len(new) - (len(self.out) - cut))]
            self.out, self.finish = self.out[:cut], "stop"
        if self.finish is None and len(self.context) >= self.n_ctx:
            self.finish = "length"
        if not self.stats.t_first_token:
            self.stats.t_first_token = time.perf_counter() - self.t0
        self.piece = self.text.update(self.out, final=self.finish is not None)
        self.new, self.origins = new, origins[: len(new)]
        if self.finish is not None:
            return None
        return Chunk(self.piece, new, origins=self.origins, stats=self.stats)

    def last(self) -> Chunk:
        """The final chunk: the last round's piece, with the result."""
        result = GenerationResult(self.out, self.text.emitted, self.finish or "length", self.stats)
        return Chunk(self.piece, self.new, result, self.origins, self.stats)


class DecodeLoop:
    """Generates one request at a time: local drafters, any verifier."""

    def __init__(
        self,
        verifier: Verifier,
        proposers: Sequence[Proposer] = (),
        policy: DraftLengthPolicy | TreePolicy | None = None,
        pipeline: bool | None = None,
    ) -> None:
        """A ``TreePolicy`` makes the (single) drafter propose one tree per round."""
        self.verifier = verifier
        self.proposers = list(proposers)
        self.policy = policy or default_policy(self.proposers, None, 16)
        self._draft_cost: dict[bool, float] = {}  # seconds per draft token, see _draft
        self._always_ahead = pipeline is True  # True: draft ahead even where it seems slow
        self._since_ahead = 0
        self._ahead_paused = 0  # rounds left without drafting ahead (after a dropped round)
        # drafters prefill the prompt in a thread while the target prefills it (True), or
        # after the target's first token is out (False); None: beside a target on another
        # machine, after one on this machine's cores (local, or a server on loopback: the
        # two passes would share the cores, and the first token would wait for both)
        self.prefill_beside: bool | None = None
        # drafting ahead needs one chain (a tree's bonus has no single guess)
        self.pipeline = (
            (verifier.pipelines if pipeline is None else pipeline)
            and len(self.proposers) == 1
            and not isinstance(self.policy, TreePolicy)
        )
        if isinstance(self.policy, TreePolicy) and (
            len(self.proposers) != 1 or not self.proposers[0].drafts_trees
        ):
            raise ConfigError("a draft tree needs exactly one drafter that drafts trees")

    def _draft(
        self,
        context: list[int],
        k: int,
        params: SamplingParams,
        draws: Sequence[Uniform],
        stats: GenerationStats,
        ahead: bool = False,
    ) -> list[Draft]:
        t0 = time.perf_counter()
        drafts = (
            [p.propose(context, k, params, u) for p, u in zip(self.proposers, draws, strict=True)]
            if k
            else []
        )
        dt = time.perf_counter() - t0
        stats.t_draft += dt
        n = sum(len(d.tokens) for d in drafts)
        if n:  # seconds per draft token, between passes (False) and during one (True)
            old = self._draft_cost.get(ahead)
            self._draft_cost[ahead] = dt / n if old is None else 0.7 * old + 0.3 * dt / n
        return drafts

    def _ahead_pays(self) -> bool:
        """False while drafting during a pass is much slower than between passes, and for a
        while after the verifier dropped a round drafted ahead."""
        if self._ahead_paused:
            self._ahead_paused -= 1
            return False
        between, during = self._draft_cost.get(False), self._draft_cost.get(True)
        if (
            self._always_ahead
            or between is None
            or during is None
            or during <= PIPELINE_MAX_SLOWDOWN * between
        ):
            return True
        self._since_ahead += 1
        if self._since_ahead >= PIPELINE_RETRY:  # measure again: the load may have moved
            self._since_ahead = 0
            return True
        return False

    def _ahead_k(self, k: int, limit: int) -> int:
        """Draft tokens (after the bonus guess) to draft ahead of a k-token round; 0: don't."""
        policy = self.policy
        if not self.pipeline or k == 0 or limit < 1:
            return 0
        if isinstance(policy, AdaptiveK) and policy.p_full(k) < PIPELINE_MIN_P_FULL:
            return 0
        if not self._ahead_pays():
            return 0
        return policy.choose(limit)

    def _send_round(
        self,
        ahead: _InFlight | None,
        context: list[int],
        version: int,
        budget: int,
        params: SamplingParams,
        draws: Sequence[Uniform],
        stats: GenerationStats,
    ) -> tuple[_InFlight, _InFlight | None]:
        """The round to read next (drafted ahead earlier, or drafted and sent now) and, where
        worth it, the next one drafted ahead and sent while this one is in flight.

        A round emits at most K + 1 tokens and holds its draft tokens in the target's cache,
        so K stays within the token budget and the context left; the draft tokens of one
        round stay within the verifier's limit (``max_draft``), several chains included."""
        room = self.verifier.n_ctx - len(context)
        cap = self._draft_cap(context)
        if isinstance(self.policy, AdaptiveK | AdaptiveTree) and ahead is None:
            self.policy.catch_up_s = sum(p.catch_up_s(context) for p in self.proposers)
        if ahead is not None:
            cur = ahead
        elif isinstance(self.policy, TreePolicy):
            return self._send_tree(context, version, budget, cap, params, draws[0], stats), None
        else:
            k = self.policy.choose(min(budget - 1, cap))
            drafts = fit_round(self._draft(context, k, params, draws, stats), cap)
            fut = self.verifier.submit(drafts, version)
            cur = _InFlight(fut, drafts, time.perf_counter(), asked=k)
        live = [d.tokens for d in cur.drafts if d.tokens]
        chain = live[0][int(cur.pipelined) :] if live else []
        # after this round: budget - len(chain) - 1 tokens to go, room - len(chain) - 1 left
        after = min(budget, room) - len(chain) - 1
        k2 = self._ahead_k(len(chain), min(after - 1, self.verifier.max_draft))
        if not k2:  # draft ahead on [context, chain]: its first token guesses the bonus
            return cur, None
        d2 = self._draft(context + chain, k2 + 1, params, draws, stats, ahead=True)
        if len(d2[0].tokens) < 2:
            return cur, None
        fut2 = self.verifier.submit(d2, version + 1, pipelined=True)
        return cur, _InFlight(fut2, d2, time.perf_counter(), pipelined=True, asked=k2)

    def _send_tree(
        self,
        context: list[int],
        version: int,
        budget: int,
        cap: int,
        params: SamplingParams,
        u: Uniform,
        stats: GenerationStats,
    ) -> _InFlight:
        """Draft and send one tree round: depth within the token budget, draws within the
        verifier's limit and the context room, paths within the verifier's tree limit."""
        assert isinstance(self.policy, TreePolicy)
        paths = self.verifier.tree_paths
        if paths < 1:
            raise ConfigError("the verifier has no tree attention (a draft tree needs it)")
        shape = self.policy.choose(min(budget - 1, cap), cap, paths)
        t0 = time.perf_counter()
        if shape.depth and shape.width == 1:  # a chain: the chain drafter's passes
            drafts = [self.proposers[0].propose(context, shape.depth, params, u)]
        elif shape.depth:
            drafts = [self.proposers[0].propose_tree(context, shape, params, u)]
        else:
            drafts = []
        dt = time.perf_counter() - t0
        stats.t_draft += dt
        drafts = fit_round(drafts, cap)
        fut = self.verifier.submit(drafts, version)
        return _InFlight(
            fut, drafts, time.perf_counter(), shape=shape, t_draft=dt, asked=shape.depth
        )

    def _resume(
        self,
        err: SessionGone,
        context: list[int],
        req: GenerationRequest,
        seed: int,
        out: list[int],
        stats: GenerationStats,
    ) -> int:
        """Re-open the session from the committed ids; returns its version (0). The draws are
        keyed by position, so the text goes on as if the session had never been lost."""
        try:
            self.verifier.open(context, req.params, seed)
        except VerifierUnavailable as e:
            raise Interrupted(
                f"{e} (lost the session: {err}); {len(out)} tokens were generated",
                list(out),
                self.verifier.tokenizer.decode(out),
            ) from None
        stats.reconnects += 1
        return 0

    def stream(self, req: GenerationRequest) -> Iterator[Chunk]:
        """Generate, yielding text as it is accepted; the last chunk carries the result.

        The first token comes from the target's prefill (its logits after the prompt), so it
        does not wait for the drafters: their prompt prefill runs beside the target's."""
        t_arrival = time.perf_counter()
        prompt = [int(t) for t in req.prompt_ids]
        self._check(req, prompt)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        draws = [drafter_uniform(seed, j) for j in range(len(self.proposers))]
        run = _Run(req, self.verifier.tokenizer, GenerationStats(seed=seed), t_arrival)
        if req.seed is not None and not req.resume_ids:
            # a seeded request replays: every drafter starts from an empty cache, so its q is
            # computed by the same passes each time (llama.cpp's floats depend on how a
            # position's KV was batched, so a cache left by an earlier request would change
            # q in its last digits, and rarely a draw; a resume keeps the drafters' caches)
            for p in self.proposers:
                p.reset()
        run.out = [int(t) for t in req.resume_ids]  # output an earlier server made
        run.text.update(run.out)  # (its text was shown already)
        stats = run.stats
        if not req.resume_ids:  # another text: what earlier ones taught counts for less
            self.policy.new_request()
        sent0, received0 = self.verifier.traffic()  # this request's bytes only
        unjoined: Callable[[], object] | None = None
        try:
            run.context, version = prompt + run.out, 0
            # a resumed request (resume_ids) goes on as the lost one would have: no prefill token
            beside = self.prefill_beside
            if beside is None:
                beside = self.verifier.remote and not self.verifier.shares_cpus
            first, prepare = self._open(
                run.context, req.params, seed, first=not req.resume_ids, beside=beside
            )
            unjoined = prepare if beside else None  # a drafter thread running
            run.n_ctx = self.verifier.n_ctx
            if isinstance(self.policy, AdaptiveK | AdaptiveTree) and not self.policy.verify.shape:
                self.policy.verify.shape.update(self.verifier.cost_shape)
            if first is not None:  # the prefill's token: a round without drafts
                version = 1
                stats.round_trips += 1  # (the open answered it)
                chunk = run.take([first], ["target"], 0, 0)
                if chunk is not None:
                    yield chunk
            if prepare is not None and (beside or self._drafts_first(req, run)):
                unjoined = None  # the drafters' prompt prefill, once the first token is out
                prepare()  # (where the policy would not draft yet, they catch up when it does)
            stats.t_prefill = time.perf_counter() - t_arrival  # (both models ready to go on)
            ahead: _InFlight | None = None
            while run.finish is None:
                budget = req.max_new_tokens - len(run.out)
                try:
                    cur, ahead = self._send_round(
                        ahead, run.context, version, budget, req.params, draws, stats
                    )
                    outcome = cur.future.result()
                except SessionGone as e:  # the verifier went away: resume from the ids we have
                    if not self.verifier.remote:
                        raise
                    ahead = None
                    version = self._resume(e, run.context, req, seed, run.out, stats)
                    run.n_ctx = self.verifier.n_ctx  # (another server: its limits)
                    continue
                wall = time.perf_counter() - cur.t_sent
                live = [d.tokens for d in cur.drafts if d.tokens]
                k_used = max((len(d.tokens) for d in cur.drafts), default=0) - int(cur.pipelined)
                stats.round_trips += 1
                if outcome.dropped:  # whatever was drafted on it goes too; the next round is
                    ahead = self._dropped(cur, ahead, stats)  # drafted afresh: progress
                    continue
                version = outcome.version
                stats.t_verify += outcome.t_verify
                stats.t_queue += outcome.t_queue
                t_round = 0.0  # network and queue time of the round (remote verifiers)
                if self.verifier.remote and not cur.pipelined:  # (a pipelined one overlapped)
                    t_net = max(0.0, wall - outcome.t_verify - outcome.t_queue)
                    stats.t_network += t_net
                    t_round = t_net + outcome.load  # the next round: this network, the queue now
                elif isinstance(self.policy, AdaptiveK | AdaptiveTree):
                    t_round = self.policy.round_overhead
                per_token = sum(p.cost_per_token for p in self.proposers)  # (as measured now)
                if cur.shape is not None:
                    k_used = _depth(cur.drafts)
                    self._update_tree(cur, outcome, per_token, t_round)
                else:
                    self.policy.update(
                        k_used,
                        outcome.n_accepted,
                        outcome.t_verify,
                        1 + sum(len(d.tokens) for d in cur.drafts) - int(cur.pipelined),
                        per_token,
                        t_round,
                    )
                if ahead is not None and not (
                    outcome.n_accepted == k_used and outcome.next_token == ahead.drafts[0].tokens[0]
                ):
                    stats.dropped += len(ahead.drafts[0].tokens)
                    stats.round_trips += 1
                    ahead = None  # the verifier drops it; the next round builds on the truth
                if outcome.accepted is not None:  # (the chain may be another drafter's)
                    accepted = list(outcome.accepted)
                else:
                    accepted = live[outcome.chain][int(cur.pipelined) :][: outcome.n_accepted]
                origins = self._origins(cur, outcome, len(accepted))
                new = [*accepted, outcome.next_token]
                chunk = run.take(new, origins, k_used, outcome.n_accepted, cur.asked)
                if chunk is not None:
                    yield chunk
            stats.t_total = time.perf_counter() - t_arrival
            sent, received = self.verifier.traffic()
            stats.bytes_sent, stats.bytes_received = sent - sent0, received - received0
            yield run.last()
        finally:
            if unjoined is not None:  # stopped at the first token: the drafters finish first
                with suppress(Exception):
                    unjoined()
            self.verifier.close()

    def _drafts_first(self, req: GenerationRequest, run: _Run) -> bool:
        """Would the first round draft? (A drafter's prompt prefill costs the first token's
        wait or more; where drafting does not pay, e.g. a 0.5B drafter beside a llama.cpp
        1.5B target on a CPU, it is left until a probe drafts.)"""
        if run.finish is not None:
            return False
        budget = req.max_new_tokens - len(run.out)
        return self.policy.drafts(min(budget - 1, self._draft_cap(run.context)))

    def _draft_cap(self, context: list[int]) -> int:
        """Draft tokens one round may hold: the verifier's limit and the context room."""
        return min(self.verifier.n_ctx - len(context) - 1, self.verifier.max_draft)

    def _open(
        self, context: list[int], params: SamplingParams, seed: int, first: bool, beside: bool
    ) -> tuple[int | None, Callable[[], object] | None]:
        """Open the session: the first token, from the target's prefill, and a callable that
        runs the drafters' prompt prefill (after the target's) or joins the thread running
        it ``beside`` the target's (both release the GIL in their passes); None: no drafter
        prefills."""
        prepare = [p for p in self.proposers if p.prepares]
        if not prepare or not beside:
            token = self.verifier.open(context, params, seed, first=first)
            return token, (lambda: [p.prepare(context) for p in prepare]) if prepare else None
        # beside the target: the drafters prefill in a thread while the server does, and the
        # first token is out as soon as the server's is (the callable joins the thread)
        pool = ThreadPoolExecutor(1)
        done = pool.submit(lambda: [p.prepare(context) for p in prepare])
        pool.shutdown(wait=False)
        try:
            token = self.verifier.open(context, params, seed, first=first)
        except BaseException:
            wait([done])  # the drafters are idle again before the error leaves
            raise
        return token, done.result

    def _update_tree(
        self, cur: _InFlight, outcome: Outcome, per_token: float, t_round: float
    ) -> None:
        """The tree policy learns from a tree round (n: the target pass's tokens)."""
        assert isinstance(self.policy, TreePolicy) and cur.shape is not None
        if isinstance(self.policy, AdaptiveTree) and per_token > 0:
            self.policy.draft_per_token = per_token
        n = 1 + sum(len(d.tokens) for d in cur.drafts)  # (repeated draws merge: at most)
        first = _first_draw_run(cur.drafts[0], list(outcome.accepted or ())) if cur.drafts else 0
        self.policy.update(
            cur.shape, outcome.n_accepted, outcome.t_verify, n, cur.t_draft, t_round, first
        )

    def _origins(self, cur: _InFlight, outcome: Outcome, n_accepted: int) -> list[str]:
        """How each token of a round came (see ``Chunk``): the accepted ones, then the last."""
        sent = [(p.name, d) for p, d in zip(self.proposers, cur.drafts, strict=False) if d.tokens]
        if not sent:
            return ["target"]
        if outcome.chain >= len(sent):  # another client's draft (a joined session)
            return [*["accepted:joined"] * n_accepted, "target"]
        name, draft = sent[outcome.chain]
        followed = len(draft.tokens) - int(cur.pipelined)
        if draft.parents is not None:  # a tree: bonus where the accepted path reached a leaf
            followed = n_accepted + int(_has_more(draft, list(outcome.accepted or ())))
        return [f"accepted:{name}"] * n_accepted + [
            "bonus" if n_accepted >= followed else "correction"
        ]

    def _dropped(
        self, cur: _InFlight, ahead: _InFlight | None, stats: GenerationStats
    ) -> _InFlight | None:
        """The verifier dropped a round drafted ahead: so is the one drafted on top of it (the
        verifier answers it "dropped" too), and the loop stops drafting ahead for a while, so
        the next round is drafted afresh on the committed text and is verified."""
        if not cur.pipelined:
            raise SessionGone("the verifier dropped a round that was not drafted ahead")
        stats.dropped += len(cur.drafts[0].tokens)
        if ahead is not None:
            stats.dropped += len(ahead.drafts[0].tokens)
            stats.round_trips += 1
        self._ahead_paused = PIPELINE_RETRY
        return None

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
        if len(req.resume_ids) >= req.max_new_tokens:
            raise ConfigError(
                f"{len(req.resume_ids)} tokens already generated; max_new_tokens is "
                f"{req.max_new_tokens}: nothing left to generate"
            )
        n = len(prompt) + len(req.resume_ids)
        if n >= self.verifier.n_ctx:
            raise ConfigError(
                f"the prompt has {n} tokens; the target's context holds {self.verifier.n_ctx}"
            )
        v = self.verifier.vocab_size
        ids = [*prompt, *req.resume_ids]
        if min(ids) < 0 or max(ids) >= v:
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


def _first_draw_run(draft: Draft, accepted: list[int]) -> int:
    """How many accepted tokens a tree gave along its nodes' first draws (parents [n] in
    level order, so a node's first child has the lowest index): what the chain of first
    draws, drafted alone, would have had accepted."""
    if draft.parents is None:
        return len(accepted)
    node, run = -1, 0
    for tok in accepted:
        kids = [i for i, p in enumerate(draft.parents) if p == node]
        if not kids or draft.tokens[kids[0]] != tok:
            break
        node, run = kids[0], run + 1
    return run


def _has_more(draft: Draft, accepted: list[int]) -> bool:
    """Whether a tree has draws below the end of the accepted path (so its last token was a
    correction, not a bonus)."""
    assert draft.parents is not None
    at = -1  # the draw the path has reached (-1: the root)
    for x in accepted:
        at = next(
            i for i, (t, p) in enumerate(zip(draft.tokens, draft.parents)) if p == at and t == x
        )
    return any(p == at for p in draft.parents)


def _depth(drafts: Sequence[Draft]) -> int:
    """The longest path of a round's drafts (a tree's depth, a chain's length)."""
    best = 0
    for d in drafts:
        if d.parents is None:
            best = max(best, len(d.tokens))
            continue
        depth: list[int] = []
        for p in d.parents:
            depth.append(1 + (depth[p] if p >= 0 else 0))
        best = max(best, max(depth, default=0))
    return best


class SpeculativeEngine:
    """Speculative decoding of one request at a time on a target backend in this process."""

    def __init__(
        self,
        target: Backend,
        proposers: Sequence[Proposer] = (),
        k: int | None = None,
        k_max: int = 16,
        policy: DraftLengthPolicy | TreePolicy | None = None,
    ) -> None:
        if (len(proposers) > 1 or isinstance(policy, TreePolicy)) and not target.supports_tree:
            raise ConfigError(f"several drafters need tree verification; {target.name} has none")
        if k is not None and not 0 <= k <= 64:
            raise ConfigError(f"k must be in [0, 64] or auto, got {k}")
        self.target = target
        self.proposers = list(proposers)
        self.policy = policy or default_policy(self.proposers, k, k_max)
        self.loop = DecodeLoop(LocalVerifier(target), self.proposers, self.policy)

    def warm_up(self, prompt_ids: Sequence[int] = ()) -> None:
        """Run each model once and measure target pass costs for the K policy (untimed)."""
        ids = list(prompt_ids) or [self.target.tokenizer.bos_token_id or 0] * 32
        shape = calibrate(self.target, ids)
        if isinstance(self.policy, AdaptiveK | AdaptiveTree):
            self.policy.verify.shape.update(shape)
        for p in self.proposers:
            p.warm_up(ids)
        if isinstance(self.policy, AdaptiveK | AdaptiveTree):
            self.policy.draft_per_token = sum(p.cost_per_token for p in self.proposers)

    def stream(self, req: GenerationRequest) -> Iterator[Chunk]:
        """Generate, yielding text as it is accepted; the last chunk carries the result."""
        return self.loop.stream(req)

    def generate(self, req: GenerationRequest) -> GenerationResult:
        """Generate to the end; returns the result."""
        return self.loop.generate(req)


def calibrate(
    target: Backend, ids: Sequence[int], sizes=(1, 2, 3, 5, 9, 13, 17)
) -> dict[int, float]:
    """Seconds of a target pass over n new tokens, for each n in sizes (median of three)."""
    shape: dict[int, float] = {}
    seq = target.new_sequence()
    try:
        target.prefill(seq, list(ids))
        base = target.length(seq)
        for n in sizes:
            times = []
            for _ in range(3):  # the first pass of a shape allocates
                t0 = time.perf_counter()
                target.forward(seq, (list(ids) * n)[:n])
                times.append(time.perf_counter() - t0)
                target.truncate(seq, base)
            shape[n] = sorted(times)[1]
    finally:
        target.free_sequence(seq)
    return shape
