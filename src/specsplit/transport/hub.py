"""A served session and the client streams drafting for it: the owner's, and those of other
drafters that joined with its id and join token. Routes rounds to the scheduler (merging the
drafts of several members into one round) and verdicts back to every member, in order."""

from __future__ import annotations

import queue
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from specsplit.engine.rounds import fit_round
from specsplit.engine.scheduler import BatchScheduler, Served
from specsplit.engine.verifier import Outcome
from specsplit.errors import SpecsplitError, StaleDraft
from specsplit.proposers.base import Draft

JOIN_WAIT = 0.25  # seconds a joined session waits for every drafter's draft of a round


@dataclass
class Member:
    """One client stream drafting for a session."""

    # (future of an outcome, whether its verdict carries the accepted ids), in order; None
    # when the client closed its side, Refused when its stream broke a rule
    out: queue.Queue
    joined: bool  # joined an existing session (needs the accepted ids)
    snapshot: tuple[list[int], int] = ([], 0)  # committed ids and version when it joined


class Hub:
    """A served session and the client streams drafting for it.

    Alone, the owner's rounds go straight to the scheduler. Once other drafters joined, the
    owner's draft opens each round and theirs join it (until JOIN_WAIT): one merged round,
    verified in one pass with the multi-draft rule, whose verdict every member hears with
    the accepted ids (the chain followed may be another member's). Whether a verdict carries
    the ids is fixed when its round is formed, so members leaving in between change nothing.
    """

    def __init__(self, scheduler: BatchScheduler, served: Served) -> None:
        self.scheduler, self.served = scheduler, served
        self.join_token = secrets.token_urlsafe(16)
        self.members: list[Member] = []
        self.lock = threading.Lock()
        self._owner: dict[int, list[Draft]] = {}  # version -> the owner's drafts (round open)
        self._joiners: dict[int, list[Draft]] = {}  # version -> joiners' drafts gathered
        self._from: dict[int, set[int]] = {}  # version -> ids of members that sent
        self._timers: dict[int, threading.Timer] = {}
        self._inflight = 0  # the owner's rounds at the scheduler while it drafts alone
        self._inflight_lock = threading.Lock()
        self._next = 0  # the lowest version not yet sent for verification (joined sessions)
        self._rounds: dict[int, Future[Outcome]] = {}  # version -> its verdict, every member hears

    def join(self, joined: bool) -> Member:
        """Add a client stream. A joining one starts hearing every round from now on; rounds
        sent before it joined finish first, so a snapshot taken after this is consistent."""
        m = Member(queue.Queue(), joined)
        with self.lock:
            self.members.append(m)
            for version in sorted(self._rounds):
                m.out.put((self._rounds[version], True))
        deadline = time.monotonic() + 10.0
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.005)
        return m

    def leave(self, m: Member) -> bool:
        """Remove a member; True if the session should end (its owner or everyone left).
        Rounds now drafted by every member left go to verification at once."""
        with self.lock:
            if m in self.members:
                self.members.remove(m)
            end = not m.joined or not self.members
            if not end:
                for version in [v for v in self._owner if len(self._from[v]) >= len(self.members)]:
                    self._fire(version)
            return end

    def _single_done(self, _: Future) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    def submit(self, m: Member, drafts: list[Draft], version: int, pipelined: bool) -> None:
        """Queue a round (see the class docstring)."""
        with self.lock:
            if len(self.members) == 1:
                fut = self.scheduler.submit(self.served, drafts, version, pipelined)
                with self._inflight_lock:
                    self._inflight += 1
                fut.add_done_callback(self._single_done)
                tree = any(d.parents is not None for d in drafts)  # its path: ids in the verdict
                m.out.put((fut, m.joined or tree))
                return
            if pipelined:  # no drafting ahead with several drafters: answer "dropped", in order
                dropped: Future[Outcome] = Future()
                dropped.set_result(Outcome(version, True, 0, -1))
                m.out.put((dropped, False))
                return
            late = version < self._next or id(m) in self._from.get(version, set())
            if late and m.joined:
                return  # the round went to verification without this draft
            if late or (not m.joined and version in self._owner):
                raise StaleDraft(f"a second round at version {version}")
            self._from.setdefault(version, set()).add(id(m))
            if m.joined:
                self._joiners.setdefault(version, []).extend(drafts)
                if version not in self._owner:
                    return  # the owner has not sent this round yet
            else:
                self._owner[version] = drafts
                self._rounds[version] = Future()
                for member in self.members:
                    member.out.put((self._rounds[version], True))
                for old in [v for v in self._joiners if v < version]:
                    del self._joiners[old]
            if len(self._from[version]) >= len(self.members):
                self._fire(version)
            elif version not in self._timers:
                t = threading.Timer(JOIN_WAIT, self._fire_later, (version,))
                t.daemon = True
                self._timers[version] = t
                t.start()

    def _fire_later(self, version: int) -> None:
        with self.lock:
            if version in self._owner:
                self._fire(version)

    def _merged(self, own: list[Draft], others: list[Draft]) -> list[Draft]:
        """The owner's drafts whole, then the joiners' cut (their longest chains first) so the
        round stays within the server's max_draft and the context left."""
        if any(d.parents is not None for d in own):
            return own  # a one-drafter tree is verified alone
        others = [d for d in others if d.parents is None]
        committed = len(self.served.state.snapshot()[0])
        cap = min(self.scheduler.max_draft, self.scheduler.target.n_ctx - committed)
        left = cap - sum(len(d.tokens) for d in own)
        return [*own, *(d for d in fit_round(others, left) if d.tokens)]

    def _fire(self, version: int) -> None:
        """Verify every drafter's draft of a round in one pass (called with the lock)."""
        drafts = self._merged(self._owner.pop(version), self._joiners.pop(version, []))
        self._from.pop(version, None)
        self._next = max(self._next, version + 1)  # later drafts for this version are late
        t = self._timers.pop(version, None)
        if t is not None:
            t.cancel()
        out = self._rounds[version]

        def done(f: Future[Outcome]) -> None:
            with self.lock:
                self._rounds.pop(version, None)
            if f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(f.result())

        try:
            self.scheduler.submit(self.served, drafts, version).add_done_callback(done)
        except SpecsplitError as e:
            self._rounds.pop(version, None)
            out.set_exception(e)
