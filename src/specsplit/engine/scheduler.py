"""Many sessions, one target: rounds from different users verified in one batched pass.

One thread owns the target backend. Sessions (``VerifySession``) submit rounds; each turn
of the loop takes the oldest round of every session that has one (up to ``max_batch``, those
that waited longest first),
runs a single ``forward_batch`` over all of them (sessions of different lengths and
different K in the same pass), decides each verdict and answers each future. After that pass
it prefills the new prompts together, in one batched pass of at most ``max_batch`` of them
(``prefill``: a chunk of each, or one chunk shared among them while others decode), so
sessions opening at once start decoding at once and a long prompt does not stall the
sessions already decoding. KV memory has a budget in bytes: idle sessions are evicted
first (their ids are kept; the cache is rebuilt by prefill if they come back).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np

from specsplit.backends.base import Backend
from specsplit.engine.prefill import prefill_budget, prefill_shares
from specsplit.engine.rounds import Round
from specsplit.engine.verifier import Outcome, Verifier, VerifySession, tree_paths
from specsplit.errors import ConfigError, Overloaded, ServerFull, SessionGone, SpecsplitError
from specsplit.proposers.base import Draft
from specsplit.sampling import SamplingParams

log = logging.getLogger("specsplit.scheduler")

WAIT_SHARE = 0.1  # of a pass's time, the longest a batch waits for sessions it just answered
PROMPT_WAITS = 10  # batch windows, the longest a prefill pass waits for prompts still arriving


@dataclass
class _Job:
    drafts: Sequence[Draft]
    version: int
    pipelined: bool
    future: Future[Outcome]
    t_submit: float = field(default_factory=time.perf_counter)


@dataclass
class Served:
    """A session as the scheduler holds it."""

    id: str
    state: VerifySession
    ready: Future[int | None]  # set once the prompt is prefilled (to the first token, if asked)
    jobs: deque[_Job] = field(default_factory=deque)
    t_prefill: float = field(default_factory=time.perf_counter)  # opened, or last prefilled
    closed: bool = False
    end_reason: str = ""


@dataclass
class SchedulerStats:
    """Counters for the metrics page (all since start)."""

    passes: int = 0  # batched verification passes
    rounds: int = 0  # rounds verified (sum of batch sizes)
    dropped: int = 0  # pipelined rounds dropped
    proposed: int = 0  # draft tokens verified
    accepted: int = 0
    emitted: int = 0  # tokens committed by rounds (accepted + correction/bonus)
    prefill_tokens: int = 0
    prefill_passes: int = 0  # batched prefill passes
    prefill_sizes: dict[int, int] = field(default_factory=dict)  # sessions -> prefill passes
    evictions: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # size -> passes
    t_verify: float = 0.0
    last_pass: float = 0.0  # seconds of the last verification pass


class BatchScheduler:
    """Owns the target; verifies rounds of many sessions in batched passes."""

    def __init__(
        self,
        target: Backend,
        *,
        max_batch: int = 8,
        max_sessions: int = 64,
        max_draft: int = 16,
        kv_budget: int | None = None,
        prefill_chunk: int = 256,
        batch_window: float = 0.005,
        idle_timeout: float = 300.0,
        cost_shape: dict[int, float] | None = None,
        id_prefix: str = "",
    ) -> None:
        """``id_prefix`` begins every session id (a Ray replica's name: ids then say where
        their session lives)."""
        if max_batch < 1 or max_sessions < 1 or max_draft < 0 or prefill_chunk < 1:
            raise ConfigError("max_batch, max_sessions, prefill_chunk must be >= 1, max_draft >= 0")
        self.target = target
        self.max_batch, self.max_sessions, self.max_draft = max_batch, max_sessions, max_draft
        self.kv_budget = kv_budget
        self.kv_per_token = target.kv_bytes_per_token()
        if kv_budget is not None and not self.kv_per_token:
            raise ConfigError(f"the {target.name} backend cannot measure its KV cache: no budget")
        self.prefill_chunk, self.batch_window, self.idle_timeout = (
            prefill_chunk,
            batch_window,
            idle_timeout,
        )
        self.cost_shape = dict(cost_shape or {})
        self.id_prefix = id_prefix
        self.stats = SchedulerStats()
        self.sessions: dict[str, Served] = {}
        self._closing: deque[tuple[Served, str]] = deque()
        self._cv = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._last_sweep = 0.0
        self._answered: set[str] = set()  # the sessions of the last verification pass

    # ---- life cycle ----

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="specsplit-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; every open session ends with SessionGone."""
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        for s in list(self.sessions.values()):
            self._end(s, "server stopping")

    @property
    def running(self) -> bool:
        """True while the loop thread is alive (a health check)."""
        return self._running and self._thread is not None and self._thread.is_alive()

    # ---- what sessions call (any thread) ----

    def open(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int, first: bool = False
    ) -> Served:
        """Register a session; its prompt is prefilled by the loop (wait on ``.ready``, which
        carries the first new token where ``first`` asked the prefill for it)."""
        state = VerifySession(prompt_ids, params, seed, self.target.vocab_size, first)
        if len(state.tokens) >= self.target.n_ctx:
            raise ConfigError(
                f"the prompt has {len(state.tokens)} tokens; the target's context holds {self.target.n_ctx}"
            )
        if self.kv_budget is not None and len(state.tokens) * self.kv_per_token > self.kv_budget:
            raise Overloaded("the prompt's KV cache alone is larger than the server's KV budget")
        with self._cv:
            if len(self.sessions) >= self.max_sessions:
                raise ServerFull(f"the server holds its maximum of {self.max_sessions} sessions")
            s = Served(self.id_prefix + secrets.token_hex(8), state, Future())
            self.sessions[s.id] = s
            self._cv.notify_all()
        return s

    def submit(
        self, s: Served, drafts: Sequence[Draft], version: int, pipelined: bool = False
    ) -> Future[Outcome]:
        """Queue a round of session s; the future carries its outcome or the error."""
        n = sum(len(d.tokens) for d in drafts) - int(pipelined)
        if n > self.max_draft:
            raise ConfigError(f"{n} draft tokens in one round; the limit is {self.max_draft}")
        job = _Job(drafts, version, pipelined, Future())
        with self._cv:
            if s.closed:
                raise SessionGone(f"session {s.id} ended: {s.end_reason}")
            s.jobs.append(job)
            s.state.last_used = time.monotonic()
            self._cv.notify_all()
        return job.future

    def close(self, s: Served, reason: str = "closed") -> None:
        """End a session (its memory is freed by the loop)."""
        with self._cv:
            self._mark_closed(s, reason)
            self._cv.notify_all()

    def _mark_closed(self, s: Served, reason: str) -> None:
        """Queue a session's end for the loop (called with the lock)."""
        if not s.closed:
            s.closed, s.end_reason = True, reason
            self._closing.append((s, reason))

    def load_hint(self) -> float:
        """Expected seconds a new round waits before its pass."""
        queued = sum(len(s.jobs) for s in list(self.sessions.values()))  # (a snapshot: other
        return (queued / self.max_batch) * self.stats.last_pass  # threads add sessions)

    def kv_bytes(self) -> int:
        """Bytes of KV cache held now."""
        return self.kv_per_token * sum(s.state.cached for s in list(self.sessions.values()))

    # ---- the loop (the only thread that touches the target) ----

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._sweep_idle()  # also on a busy server: idle sessions time out anyway
                while self._running and not self._has_work():
                    self._cv.wait(timeout=1.0)
                    self._sweep_idle()
                if not self._running:
                    return
                self._wait_for_batch()
                closing = list(self._closing)
                self._closing.clear()
            for s, reason in closing:
                self._end(s, reason)
            try:
                self._turn()
            except Exception:  # a bug must not kill the server: fail the batch, go on
                log.exception("scheduler turn failed")

    def _has_work(self) -> bool:
        return bool(self._closing) or any(
            s.jobs or not s.ready.done() for s in self.sessions.values() if not s.closed
        )

    def _wait_for_batch(self) -> None:
        """Give other decoding sessions a moment to send their rounds (called with the lock):
        ``batch_window``, and while a session the last pass answered has not sent its next
        round yet, up to ``WAIT_SHARE`` of that pass's time. A client's turn around (its
        answer through gRPC, its next draft, the request back) takes a few ms per client on
        this 2-core machine; a 5 ms window alone let 8 replaying clients split into batches
        of 3 on average, each batch waiting a whole pass for the other's."""
        if self.batch_window <= 0:
            return
        self._wait_for_prompts()
        now = time.perf_counter()
        short = now + self.batch_window
        long = now + max(self.batch_window, WAIT_SHARE * self.stats.last_pass)
        while True:
            decoding = [s for s in self.sessions.values() if s.ready.done() and not s.closed]
            waiting = sum(1 for s in decoding if s.jobs)
            if waiting >= min(len(decoding), self.max_batch):
                return
            due = any(not s.jobs and s.id in self._answered for s in decoding)
            left = (long if due else short) - time.perf_counter()
            if left <= 0:
                return
            self._cv.wait(timeout=left)

    def _wait_for_prompts(self) -> None:
        """Prompts arriving together are prefilled together: while no round waits, wait until
        no new prompt has come for ``batch_window`` (at most ``PROMPT_WAITS`` windows in all).
        Without it, of 8 clients starting at once here the first pass held the one or two
        whose requests came first, and the others' prompts waited for that pass."""
        end = time.perf_counter() + PROMPT_WAITS * self.batch_window
        while True:
            sessions = [s for s in self.sessions.values() if not s.closed]
            if any(s.jobs and s.ready.done() for s in sessions):
                return
            new = [s.t_prefill for s in sessions if not s.ready.done()]
            left = min(end, max(new, default=0.0) + self.batch_window) - time.perf_counter()
            if left <= 0:
                return
            self._cv.wait(timeout=left)

    def _sweep_idle(self) -> None:
        """Close sessions idle longer than the timeout (at most once a second; with the lock)."""
        now = time.monotonic()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for s in list(self.sessions.values()):
            if not s.closed and not s.jobs and now - s.state.last_used > self.idle_timeout:
                log.info("session %s idle for %.0f s: closing", s.id, now - s.state.last_used)
                self._mark_closed(s, "idle timeout")

    def _end(self, s: Served, reason: str) -> None:
        s.closed, s.end_reason = True, s.end_reason or reason
        s.state.release(self.target)
        self.sessions.pop(s.id, None)
        err = SessionGone(f"session {s.id} ended: {s.end_reason}")
        while s.jobs:
            s.jobs.popleft().future.set_exception(err)
        if not s.ready.done():
            s.ready.set_exception(err)

    def _turn(self) -> None:
        with self._cv:
            live = [s for s in self.sessions.values() if not s.closed]
        batch = [s for s in live if s.jobs and s.ready.done() and not s.state.missing()]
        # the oldest waiting rounds first: sessions that always have a round queued (clients
        # drafting ahead) must not keep the others waiting
        batch.sort(key=lambda s: s.jobs[0].t_submit)
        batch = batch[: self.max_batch]
        if batch:
            self._verify(batch)
        # new prompts, and evicted sessions that have a round waiting (rebuilt on demand)
        todo = [
            s
            for s in live
            if not s.closed and (not s.ready.done() or (s.jobs and s.state.missing()))
        ]
        if todo:
            self._prefill(todo, self._decoding(live))

    @staticmethod
    def _decoding(live: Sequence[Served]) -> int:
        """Prefilled sessions that have a round waiting or had one in the last second."""
        now = time.monotonic()
        return sum(
            1
            for s in live
            if s.ready.done()
            and not s.state.missing()
            and (s.jobs or now - s.state.last_used < 1.0)
        )

    def _ensure_room(
        self, keep: Sequence[Served], extra_tokens: int, waiting: bool = False
    ) -> bool:
        """Evict idle sessions (least recently used first) until extra tokens fit the budget;
        with ``waiting``, then sessions whose rounds wait too (each is rebuilt from its ids
        when its round's turn comes)."""
        if self.kv_budget is None:
            return True
        sessions = list(self.sessions.values())  # (other threads add sessions)
        need = self.kv_per_token * (sum(s.state.cached for s in sessions) + extra_tokens)
        victims = sorted(
            (s for s in sessions if s not in keep and s.state.cached and (waiting or not s.jobs)),
            key=lambda s: (bool(s.jobs), s.state.last_used),  # idle ones first
        )
        while need > self.kv_budget and victims:
            victim = victims.pop(0)
            need -= victim.state.cached * self.kv_per_token
            victim.state.release(self.target)
            self.stats.evictions += 1
            what = "waiting" if victim.jobs else "idle"
            log.info("evicted the KV cache of %s session %s", what, victim.id)
        return need <= self.kv_budget

    def _prefill(self, todo: list[Served], decoding: int) -> None:
        """One batched prefill pass over the sessions that waited longest (see ``prefill``)."""
        todo = sorted(todo, key=lambda s: s.t_prefill)
        take = todo[: min(self.max_batch, self.prefill_chunk)]
        budget = prefill_budget(len(take), self.prefill_chunk, decoding)
        missing = [s.state.missing() for s in take]
        shares = prefill_shares(missing, budget, self.prefill_chunk, self.target.pads_batch)
        while not self._ensure_room(take, sum(shares)):
            if len(take) == 1:  # not even one chunk fits
                s = take[0]
                if s.state.cached == 0 and not self._others_hold_kv(s):
                    self._fail(s, Overloaded("the prompt does not fit the server's KV budget"))
                return  # wait for other sessions to finish
            take.pop()
            shares.pop()
        parts = [s.state.prefill_part(self.target, n) for s, n in zip(take, shares, strict=True)]
        items = [(s, p) for s, p in zip(take, parts, strict=True) if p]
        for s, p in zip(take, parts, strict=True):
            if not p:  # nothing to bring in (a one-token prompt): ready as it is
                self._prefilled(s, 0, None)
        if not items:
            return
        try:
            logits = self.target.prefill_batch([(s.state.seq, p) for s, p in items])  # [V] each
        except SpecsplitError as e:
            if len(items) == 1:
                self._fail(items[0][0], e)
                return
            log.warning("batched prefill failed (%s): one prompt at a time", e)
            self._prefill_alone(items)
            return
        self.stats.prefill_passes += 1
        sizes = self.stats.prefill_sizes
        sizes[len(items)] = sizes.get(len(items), 0) + 1
        for (s, p), lg in zip(items, logits, strict=True):
            self._prefilled(s, len(p), lg)

    def _prefill_alone(self, items: list[tuple[Served, list[int]]]) -> None:
        """Each part in its own pass; a session whose part fails alone ends."""
        for s, p in items:
            assert s.state.seq is not None
            try:
                lg = self.target.prefill(s.state.seq, p)  # [V]
            except SpecsplitError as e:
                self._fail(s, e)
                continue
            self.stats.prefill_passes += 1
            self.stats.prefill_sizes[1] = self.stats.prefill_sizes.get(1, 0) + 1
            self._prefilled(s, len(p), lg)

    def _prefilled(self, s: Served, n: int, logits: np.ndarray | None) -> None:
        """n tokens of s are in the cache (logits [V] after the last); ready once all are."""
        if n:
            assert logits is not None
            s.state.prefilled(n, logits)
        self.stats.prefill_tokens += n
        s.t_prefill = time.perf_counter()
        if not s.state.missing():
            s.state.last_used = time.monotonic()  # rebuilt: not the next to evict
            if not s.ready.done():
                s.ready.set_result(s.state.first)

    def _others_hold_kv(self, s: Served) -> bool:
        return any(o is not s and o.state.cached for o in list(self.sessions.values()))

    def _fail(self, s: Served, err: Exception) -> None:
        if not s.ready.done():
            s.ready.set_exception(err)
        with self._cv:
            self._mark_closed(s, str(err))

    def _fit(self, planned: list[tuple[Served, _Job, Round]]) -> list[tuple[Served, _Job, Round]]:
        """The planned rounds whose tokens fit the KV budget (the others go back to the head
        of their queues). Idle sessions are evicted first; if not even the oldest round fits
        beside the caches of sessions whose rounds wait, those are evicted for it, so the
        loop always moves on; a session that outgrew the budget alone ends (Overloaded)."""
        extra = sum(len(r.tokens) for _, _, r in planned)
        back = []
        while planned and not self._ensure_room([p[0] for p in planned], extra):
            back.append(planned.pop())  # does not fit now
            extra -= len(back[-1][2].tokens)
        if not planned and back:
            s, job, rnd = back.pop()  # the oldest round
            if self._ensure_room([s], len(rnd.tokens), waiting=True):
                planned.append((s, job, rnd))
            else:
                err = Overloaded("the session's KV cache outgrew the server's KV budget")
                job.future.set_exception(err)
                self._fail(s, err)
        with self._cv:
            for s, job, _ in back:
                s.jobs.appendleft(job)
        return planned

    def _fit_paths(
        self, planned: list[tuple[Served, _Job, Round]]
    ) -> list[tuple[Served, _Job, Round]]:
        """The planned rounds whose trees fit together in one pass of a target that holds a
        bounded number of root-to-leaf paths at once (llama.cpp: 32); the others go back to
        the head of their queues (the first round always goes: a client keeps within it)."""
        budget = getattr(self.target, "max_tree_paths", None)
        if budget is None:
            return planned
        keep, back, used = [], [], 0
        for item in planned:
            parents = item[2].parents
            paths = 0 if parents is None else len(parents) - len(set(parents) - {-1})
            if keep and used + paths > budget:
                back.append(item)
                continue
            keep.append(item)
            used += paths
        with self._cv:
            for s, job, _ in reversed(back):
                s.jobs.appendleft(job)
        return keep

    def _verify(self, batch: list[Served]) -> None:
        t_start = time.perf_counter()
        planned: list[tuple[Served, _Job, Round]] = []
        for s in batch:
            with self._cv:
                job = s.jobs.popleft()
            try:
                rnd = s.state.plan(job.drafts, job.version, job.pipelined)
                if rnd is not None and s.state.cached + len(rnd.tokens) > self.target.n_ctx:
                    raise ConfigError(
                        f"the session would hold {s.state.cached + len(rnd.tokens)} tokens; "
                        f"the context holds {self.target.n_ctx}"
                    )
            except SpecsplitError as e:
                job.future.set_exception(e)
                continue
            except Exception as e:  # a bug: answer the round, do not leave its client waiting
                log.exception("planning a round failed")
                job.future.set_exception(SessionGone(f"internal error: {type(e).__name__}"))
                continue
            if rnd is None:
                self.stats.dropped += 1
                job.future.set_result(s.state.dropped())
                continue
            planned.append((s, job, rnd))
        planned = self._fit(self._fit_paths(planned))
        if not planned:
            return
        t0 = time.perf_counter()
        try:
            logits = self.target.forward_batch(
                [(s.state.seq, r.tokens, r.parents) for s, _, r in planned]
            )  # per session [n_b, V]
        except Exception as e:
            log.exception("batched target pass failed")
            for s, job, _ in planned:
                job.future.set_exception(SessionGone(f"the target pass failed: {e}"))
                self._fail(s, e)
            return
        t_pass = time.perf_counter() - t0
        st = self.stats
        st.passes += 1
        st.rounds += len(planned)
        st.batch_sizes[len(planned)] = st.batch_sizes.get(len(planned), 0) + 1
        st.t_verify += t_pass
        st.last_pass = t_pass
        self._answered = {s.id for s, _, _ in planned}
        for (s, job, rnd), lg in zip(planned, logits, strict=True):
            try:
                out = s.state.apply(self.target, rnd, lg)
            except Exception as e:  # a bug: end this session, answer its client
                log.exception("deciding a round failed")
                job.future.set_exception(SessionGone(f"internal error: {type(e).__name__}"))
                self._fail(s, e)
                continue
            st.proposed += rnd.n_draft
            st.accepted += out.n_accepted
            st.emitted += out.n_accepted + 1
            job.future.set_result(
                replace(
                    out,
                    t_verify=t_pass,
                    t_queue=max(0.0, t_start - job.t_submit),
                    batch_size=len(planned),
                    load=self.load_hint(),
                )
            )


class ScheduledVerifier(Verifier):
    """A verifier for one session of a scheduler in this process (server-side drafting,
    cloud-only generation, the HTTP face)."""

    def __init__(self, scheduler: BatchScheduler) -> None:
        self.scheduler = scheduler
        t = scheduler.target
        self.tokenizer, self.vocab_size, self.n_ctx = t.tokenizer, t.vocab_size, t.n_ctx
        self.cost_shape = scheduler.cost_shape
        self.max_draft = scheduler.max_draft
        self.tree_paths = tree_paths(scheduler.target)
        self.served: Served | None = None

    def open(
        self, prompt_ids: Sequence[int], params: SamplingParams, seed: int, first: bool = False
    ) -> int | None:
        self.close()
        self.served = self.scheduler.open(prompt_ids, params, seed, first)
        return self.served.ready.result()

    def submit(
        self, drafts: Sequence[Draft], version: int, pipelined: bool = False
    ) -> Future[Outcome]:
        if self.served is None:
            raise ConfigError("no open session")
        return self.scheduler.submit(self.served, drafts, version, pipelined)

    def close(self) -> None:
        if self.served is not None:
            self.scheduler.close(self.served)
            self.served = None
