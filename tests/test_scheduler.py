"""The batch scheduler on a tiny model: batched rounds equal single ones (chains and token
trees, on every backend), KV budget eviction and rebuild, chunked prefill that does not stall
decoding sessions."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from conftest import perturbed, tiny_llama
from specsplit.backends.base import Backend
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.numpy_backend import NumpyBackend
from specsplit.backends.torch_backend import TorchBackend
from specsplit.engine.draft_length import FixedK
from specsplit.engine.prefill import padded_length, prefill_budget, prefill_shares
from specsplit.engine.scheduler import BatchScheduler, ScheduledVerifier, Served
from specsplit.engine.speculative import DecodeLoop, GenerationRequest, SpeculativeEngine
from specsplit.engine.verifier import LocalVerifier, Outcome
from specsplit.errors import Overloaded
from specsplit.proposers.base import Draft, Proposer
from specsplit.proposers.draft_model import DraftModelProposer
from specsplit.proposers.ngram import NGramProposer
from specsplit.sampling import GREEDY

PROMPT = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 32, 72, 101]


@pytest.fixture(scope="module")
def setup():
    tok = ByteTokenizer(300)
    model = tiny_llama(vocab=300, seed=0)
    return tok, model, perturbed(model, 0.08, seed=1)


def _scheduler(model, tok, **kw) -> BatchScheduler:
    s = BatchScheduler(TorchBackend(model, tok), batch_window=0.0, **kw)
    s.start()
    return s


def test_evicted_session_is_rebuilt_and_stays_exact(setup):
    tok, model, draft = setup
    ref = SpeculativeEngine(TorchBackend(model, tok)).generate(GenerationRequest(PROMPT, 40))
    per_token = TorchBackend(model, tok).kv_bytes_per_token()
    sch = _scheduler(model, tok, kv_budget=per_token * 80)  # room for about one session
    try:
        idle = sch.open(PROMPT, GREEDY, 0)
        idle.ready.result(10)
        assert idle.state.cached == len(PROMPT) - 1
        loop = DecodeLoop(
            ScheduledVerifier(sch), [DraftModelProposer(TorchBackend(draft, tok))], FixedK(3)
        )
        got = loop.generate(GenerationRequest(PROMPT[:4] * 12, 24))  # needs the idle one's room
        assert sch.stats.evictions >= 1 and idle.state.seq is None
        # the idle session comes back: its cache is rebuilt from its ids, its text is exact
        loop2 = DecodeLoop(ScheduledVerifier(sch), [], FixedK(0))
        assert loop2.generate(GenerationRequest(PROMPT, 40)).token_ids == ref.token_ids
        fut = sch.submit(idle, [], 0)
        assert fut.result(10).next_token == ref.token_ids[0]
        assert got.stats.new_tokens == 24
    finally:
        sch.stop()


def test_prompt_larger_than_budget_is_refused(setup):
    tok, model, _ = setup
    per_token = TorchBackend(model, tok).kv_bytes_per_token()
    sch = _scheduler(model, tok, kv_budget=per_token * 8)
    try:
        with pytest.raises(Overloaded):
            sch.open(PROMPT, GREEDY, 0)
    finally:
        sch.stop()


def test_long_prompt_is_prefilled_in_chunks_between_rounds(setup):
    tok, model, _ = setup
    sch = _scheduler(model, tok, prefill_chunk=16)
    try:
        busy = sch.open(PROMPT, GREEDY, 0)
        busy.ready.result(10)
        long = sch.open(PROMPT * 40, GREEDY, 1)  # 640 tokens: 40 chunks
        verdicts = 0
        version = 0
        while not long.ready.done():
            version = sch.submit(busy, [], version).result(10).version
            verdicts += 1
        assert verdicts >= 5  # the decoding session kept going while the prompt was prefilled
        assert long.state.cached == len(PROMPT) * 40 - 1
    finally:
        sch.stop()


def test_sessions_with_rounds_queued_do_not_starve_the_others(setup):
    """More sessions with rounds waiting than a pass takes: the oldest waiting rounds go first.
    Sessions that always have a round queued (clients drafting ahead) must not keep a later
    session's round waiting for as long as they run."""
    tok, model, _ = setup
    sch = _scheduler(model, tok, max_batch=1)
    busy = [sch.open(PROMPT, GREEDY, i) for i in range(2)]
    late = sch.open(PROMPT[:8], GREEDY, 2)
    for s in [*busy, late]:
        s.ready.result(10)
    stop = False

    def hog(s) -> None:  # two rounds queued at all times
        futs = [sch.submit(s, [], 0), sch.submit(s, [], 1)]
        version = 2
        while not stop and version < 200:
            futs.pop(0).result(10)
            futs.append(sch.submit(s, [], version))
            version += 1
        for f in futs:
            f.result(10)

    threads = [threading.Thread(target=hog, args=(s,)) for s in busy]
    try:
        for t in threads:
            t.start()
        while sch.stats.passes < 6:  # the hogs are under way
            time.sleep(0.01)
        passes = sch.stats.passes
        sch.submit(late, [], 0).result(30)
        # one round per pass: the pass under way, the rounds queued before it (two per hog)
        # and its own; without the oldest-first rule it waited for every hog round (~390)
        assert sch.stats.passes - passes <= 8
    finally:
        stop = True
        for t in threads:
            t.join()
        sch.stop()


def test_full_kv_budget_with_every_session_busy_keeps_going(setup):
    """The KV budget is full and every session has a round queued (none idle to evict): the
    scheduler evicts a waiting session's cache (rebuilt later from its ids) rather than
    putting every round back forever. Texts stay exact."""
    tok, model, _ = setup
    rounds = 30
    ref = SpeculativeEngine(TorchBackend(model, tok)).generate(GenerationRequest(PROMPT, rounds))
    per_token = TorchBackend(model, tok).kv_bytes_per_token()
    sch = _scheduler(model, tok, max_batch=2, kv_budget=per_token * 60)  # two sessions' worth
    sessions = [sch.open(PROMPT, GREEDY, i) for i in range(3)]
    out: list[list[int]] = [[] for _ in sessions]

    def hog(i: int) -> None:  # two rounds queued at all times
        s = sessions[i]
        futs = [sch.submit(s, [], 0), sch.submit(s, [], 1)]
        for version in range(2, rounds + 2):
            out[i].append(futs.pop(0).result(30).next_token)
            if version < rounds:
                futs.append(sch.submit(s, [], version))

    threads = [threading.Thread(target=hog, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "rounds stopped being verified"
        assert out == [ref.token_ids] * 3
        assert sch.stats.evictions >= 1
        assert sch.kv_bytes() <= per_token * 60
    finally:
        sch.stop()


def test_counters_read_while_sessions_come_and_go(setup):
    """The KV bytes and the load hint are read by other threads (metrics, every Opened)
    while sessions are added and removed: no "dictionary changed size during iteration"."""
    tok, model, _ = setup
    sch = _scheduler(model, tok, max_sessions=64, kv_budget=1 << 30)
    errors: list[BaseException] = []
    done = threading.Event()

    def churn() -> None:
        while not done.is_set():
            opened = [sch.open(PROMPT[:4], GREEDY, i) for i in range(8)]
            for s in opened:
                sch.close(s)
            while len(sch.sessions) > 32 and not done.is_set():  # the loop ends closed ones
                time.sleep(0.001)

    def read() -> None:
        try:
            while not done.is_set():
                sch.kv_bytes()
                sch.load_hint()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    threads = [threading.Thread(target=churn), threading.Thread(target=read)]
    try:
        for t in threads:
            t.start()
        time.sleep(3)
    finally:
        done.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)
        sch.stop()
    assert not errors, repr(errors[0])


def test_batched_rounds_equal_rounds_alone(setup):
    tok, model, draft = setup
    prompts = [PROMPT[: 5 + 3 * i] for i in range(4)]
    refs = [
        SpeculativeEngine(TorchBackend(model, tok)).generate(GenerationRequest(p, 12)).token_ids
        for p in prompts
    ]
    sch = _scheduler(model, tok, max_batch=8)
    try:
        sessions = [sch.open(p, GREEDY, i) for i, p in enumerate(prompts)]
        for s in sessions:
            s.ready.result(10)
        outs = [[] for _ in prompts]
        versions = [0] * len(prompts)
        for step in range(12):
            drafts = [
                []
                if step % 2
                else [
                    DraftModelProposer(TorchBackend(draft, tok)).propose(
                        s.state.tokens, 1 + i, GREEDY, None
                    )
                ]
                for i, s in enumerate(sessions)
            ]
            futs = [sch.submit(s, d, v) for s, d, v in zip(sessions, drafts, versions)]
            for i, f in enumerate(futs):
                o = f.result(10)
                versions[i] = o.version
                outs[i] += [*o.accepted, o.next_token]
        assert max(sch.stats.batch_sizes) > 1
        assert [o[:12] for o in outs] == refs
    finally:
        sch.stop()


def test_idle_session_times_out(setup):
    tok, model, _ = setup
    sch = _scheduler(model, tok, idle_timeout=0.5)
    try:
        s = sch.open(PROMPT, GREEDY, 0)
        s.ready.result(10)
        deadline = time.time() + 5
        while sch.sessions and time.time() < deadline:
            time.sleep(0.1)
        assert not sch.sessions and s.closed and s.state.seq is None
    finally:
        sch.stop()


# ---- new prompts prefilled together -------------------------------------------------------


def test_prefill_shares():
    assert prefill_shares([100, 100, 100], 90, 256) == [30, 30, 30]
    assert prefill_shares([5, 100, 100], 90, 256) == [5, 42, 43]  # the rest goes to the others
    assert prefill_shares([300, 10], 512, 256) == [256, 10]  # at most a chunk each
    assert prefill_shares([7, 7, 7], 3, 256) == [1, 1, 1]
    # a padded pass: rows of one length n, the first step of the cheapest plan (rows + 32 per
    # pass), within the budget and the cap
    assert prefill_shares([5, 100, 100], 90, 256, same_length=True) == [5, 5, 5]
    assert prefill_shares([5, 100, 100], 300, 256, same_length=True) == [5, 5, 5]
    assert prefill_shares([90, 100, 100], 300, 256, same_length=True) == [90, 100, 100]
    assert prefill_shares([7, 7, 7, 11, 11], 512, 256, same_length=True) == [7, 7, 7, 11, 11]
    assert prefill_shares([300, 290], 512, 256, same_length=True) == [256, 256]
    assert prefill_shares([100, 100, 100], 90, 256, same_length=True) == [30, 30, 30]
    assert prefill_shares([10, 100], 90, 256, same_length=True) == [10, 10]


def test_padded_length_is_the_first_pass_of_the_cheapest_plan():
    """Against every plan by brute force: the first level of the least-cost rising sequence of
    levels, a pass costing its rows (padding included) plus pass_rows."""
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(200):
        missing = [int(x) for x in rng.integers(1, 60, size=int(rng.integers(1, 6)))]
        w = int(rng.integers(0, 80))
        levels = sorted(set(missing))

        def cost(plan: tuple[int, ...], missing: list[int] = missing, w: int = w) -> int:
            total, base = 0, 0
            for lv in plan:
                total += sum(1 for m in missing if m > base) * (lv - base) + w
                base = lv
            return total

        plans = [
            c + (levels[-1],)
            for r in range(len(levels))
            for c in itertools.combinations(levels[:-1], r)
        ]
        least = min(map(cost, plans))
        assert padded_length(missing, w) in {p[0] for p in plans if cost(p) == least}
    assert prefill_budget(4, 64, decoding=4) == 64  # one chunk: as many decode as wait
    assert prefill_budget(4, 64, decoding=9) == 64
    assert prefill_budget(7, 64, decoding=1) == 7 * 64  # one stall lets 7 sessions start
    assert prefill_budget(7, 64, decoding=2) == 3 * 64
    assert prefill_budget(4, 64, decoding=0) == 256


class PrefillLog:
    """Wraps a backend's prefill_batch: the tokens of each item of every pass, and the KV tokens
    held (all sessions, this pass's included) at each pass."""

    def __init__(self, sch: BatchScheduler) -> None:
        self.sch, self.inner = sch, sch.target.prefill_batch
        self.passes: list[list[int]] = []
        self.held: list[int] = []
        sch.target.prefill_batch = self

    def __call__(self, items):  # noqa: ANN001, ANN204
        self.passes.append([len(t) for _, t in items])
        held = sum(s.state.cached for s in list(self.sch.sessions.values()))
        self.held.append(held + sum(self.passes[-1]))
        return self.inner(items)


def open_together(sch: BatchScheduler, prompts: list[list[int]], new_tokens: int) -> list:
    """One greedy cloud-only generation per prompt, each on its own thread, all opened before
    the scheduler starts (so their prompts wait together); the token ids of each."""
    out: list = [None] * len(prompts)

    def run(i: int) -> None:
        loop = DecodeLoop(ScheduledVerifier(sch), [], FixedK(0))
        out[i] = loop.generate(GenerationRequest(prompts[i], new_tokens)).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while len(sch.sessions) < len(prompts) and time.time() < deadline:
        time.sleep(0.01)
    sch.start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_sessions_opening_at_once_are_prefilled_together(setup, kind):
    """Five prompts (three of 8 tokens, two of 12) arrive together: prefilled in one batched
    pass (padded on torch), every first token (from the prefill) and every greedy text equal
    to the target alone's."""
    tok, model, _ = setup
    prompts = [PROMPT[i : 8 + i] for i in range(3)] + [PROMPT[i : 12 + i] for i in range(2)]
    refs = [
        SpeculativeEngine(TorchBackend(model, tok)).generate(GenerationRequest(p, 10)).token_ids
        for p in prompts
    ]
    target = TorchBackend(model, tok) if kind == "torch" else NumpyBackend.from_torch(model, tok)
    sch = BatchScheduler(target, batch_window=0.0, max_batch=8)
    log = PrefillLog(sch)
    try:
        assert open_together(sch, prompts, 10) == refs
    finally:
        sch.stop()
    # the whole prompts, first token included, in one pass (on torch padded to 12 rows: one
    # pass of 5 x 12 rows is cheaper than 5 x 8 and then 2 x 4)
    assert [sorted(p) for p in log.passes] == [[8, 8, 8, 12, 12]]  # (in order of arrival)
    assert sch.stats.prefill_sizes == {5: 1}
    assert max(sch.stats.batch_sizes) > 1


def test_prompts_arriving_a_few_ms_apart_are_prefilled_in_one_pass(setup):
    """Four sessions open 10 ms apart on a running scheduler (window 50 ms): the first
    prefill pass waits for them and holds all four."""
    tok, model, _ = setup
    sch = BatchScheduler(TorchBackend(model, tok), batch_window=0.05, max_batch=8)
    log = PrefillLog(sch)
    sch.start()
    try:
        served = []
        for i in range(4):
            served.append(sch.open(PROMPT[: 8 + i], GREEDY, i))
            time.sleep(0.01)
        for s in served:
            s.ready.result(10)
    finally:
        sch.stop()
    assert log.passes[0] == [7, 8, 9, 10]


def test_a_pass_waits_for_the_sessions_the_last_pass_answered(setup):
    """Passes of ~0.2 s; one client answers at once, the other 20 ms after its answer (longer
    than the 5 ms window, within 10% of a pass): after the first rounds both go in every
    pass, where with the window alone they would alternate."""
    tok, model, _ = setup
    sch = BatchScheduler(TorchBackend(model, tok), batch_window=0.005, max_batch=8)
    inner = sch.target.forward_batch

    def slow(items):  # noqa: ANN001, ANN202
        time.sleep(0.2)
        return inner(items)

    sch.target.forward_batch = slow
    sch.start()
    sizes: list[list[int]] = [[], []]
    try:
        a, b = sch.open(PROMPT, GREEDY, 0), sch.open(PROMPT[:12], GREEDY, 1)
        a.ready.result(10), b.ready.result(10)

        def client(s: Served, i: int, delay: float) -> None:
            version = 0
            for _ in range(6):
                out = sch.submit(s, [], version).result(10)
                sizes[i].append(out.batch_size)
                version = out.version
                time.sleep(delay)

        threads = [
            threading.Thread(target=client, args=(a, 0, 0.0)),
            threading.Thread(target=client, args=(b, 1, 0.02)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        sch.stop()
    assert sizes[1][1:-1] == [2] * 4, sizes  # (the first and last may go alone)


def test_batched_prefill_keeps_max_batch_and_chunks(setup):
    """Five prompts, max_batch 2, chunks of 8: at most two sessions and a chunk each per pass;
    texts exact (the first token decided after the last chunk)."""
    tok, model, _ = setup
    prompts = [PROMPT[: 4 + 3 * i] for i in range(5)]  # 4 .. 16 tokens
    refs = [
        SpeculativeEngine(TorchBackend(model, tok)).generate(GenerationRequest(p, 6)).token_ids
        for p in prompts
    ]
    sch = BatchScheduler(TorchBackend(model, tok), batch_window=0.0, max_batch=2, prefill_chunk=8)
    log = PrefillLog(sch)
    try:
        assert open_together(sch, prompts, 6) == refs
    finally:
        sch.stop()
    assert all(len(p) <= 2 and max(p) <= 8 for p in log.passes)
    assert sum(map(sum, log.passes)) == sum(len(p) for p in prompts)
    assert max(map(len, log.passes)) == 2


def test_prefill_shares_one_chunk_per_prompt_per_decoding_session(setup):
    """A session decodes while a long and a short prompt arrive: each prefill pass computes
    at most one chunk per prompt waiting per session decoding (two chunks while both wait,
    one after), both prompts share the passes, and the short one is ready long before the
    long one."""
    tok, model, _ = setup
    sch = _scheduler(model, tok, prefill_chunk=16)
    try:
        busy = sch.open(PROMPT, GREEDY, 0)
        busy.ready.result(10)
        log = PrefillLog(sch)
        version = sch.submit(busy, [], 0).result(10).version
        long = sch.open(PROMPT * 20, GREEDY, 1)  # 320 tokens
        short = sch.open(PROMPT * 2, GREEDY, 2)  # 32 tokens
        passes_when_short = None
        while not long.ready.done():
            version = sch.submit(busy, [], version).result(10).version
            if short.ready.done() and passes_when_short is None:
                passes_when_short = len(log.passes)
        assert [16, 16] in log.passes  # both together: two chunks (one in all would be 8 + 8)
        assert all(max(p) <= 16 for p in log.passes)  # a chunk each at most, so one alone
        assert passes_when_short is not None and passes_when_short < len(log.passes) / 2
        assert long.state.cached == len(PROMPT) * 20 - 1
    finally:
        sch.stop()


def test_prefill_respects_the_kv_budget(setup):
    """Four sessions open at once with room for about two: no pass goes past the budget, every
    text is exact."""
    tok, model, _ = setup
    prompts = [PROMPT[: 10 + 2 * i] for i in range(4)]
    refs = [
        SpeculativeEngine(TorchBackend(model, tok)).generate(GenerationRequest(p, 8)).token_ids
        for p in prompts
    ]
    per_token = TorchBackend(model, tok).kv_bytes_per_token()
    sch = BatchScheduler(
        TorchBackend(model, tok), batch_window=0.0, max_batch=8, kv_budget=per_token * 48
    )
    log = PrefillLog(sch)
    try:
        assert open_together(sch, prompts, 8) == refs
    finally:
        sch.stop()
    assert max(log.held) <= 48
    assert max(map(len, log.passes)) >= 2  # still batched where the budget allows


# ---- token trees from several sessions in one batched pass, on every backend ----------------


def tree_round(drafter: Proposer, ngram: Proposer, context: list[int], r: int, vocab: int):
    """Round r's drafts: the drafter's chain d and copies of d that branch off it at depth 1
    or 2, so the target sees a token tree (a shared prefix, then siblings); every third round
    one plain chain."""
    k = 2 + r % 3
    d = drafter.propose(context, k, GREEDY, None).tokens  # [k]

    def branch(at: int) -> Draft:
        return Draft([*d[:at], (d[at] + 1) % vocab, *d[at + 1 :]])

    if r % 3 == 0:
        return [Draft(d), branch(1)]
    if r % 3 == 1:
        return [branch(2), branch(1), ngram.propose(context, 3, GREEDY, None)]
    return [Draft(d)]


def run_batched(target: Backend, prompts, drafter: Proposer, rounds: int):
    """Every session's rounds verified together by a BatchScheduler; returns per session the
    drafts sent and the outcomes, and the scheduler's batch sizes."""
    sch = BatchScheduler(target, max_batch=8, batch_window=0.5)  # waits for every session
    sch.start()
    try:
        sessions = [sch.open(p, GREEDY, seed=i) for i, p in enumerate(prompts)]
        for s in sessions:
            s.ready.result(60)
        ngrams = [NGramProposer() for _ in prompts]
        sent: list[list[list[Draft]]] = [[] for _ in prompts]
        outs: list[list[Outcome]] = [[] for _ in prompts]
        for r in range(rounds):
            snaps = [s.state.snapshot() for s in sessions]  # (tokens, version)
            drafts = [
                tree_round(drafter, ngrams[i], toks, r + i, target.vocab_size)
                for i, (toks, _) in enumerate(snaps)
            ]
            futs = [sch.submit(s, d, v) for s, d, (_, v) in zip(sessions, drafts, snaps)]
            for i, f in enumerate(futs):
                sent[i].append(drafts[i])
                outs[i].append(f.result(60))
        return sent, outs, dict(sch.stats.batch_sizes)
    finally:
        sch.stop()


def replay_alone(target: Backend, prompt, seed: int, sent: Sequence[Sequence[Draft]]):
    """The same rounds verified one session at a time with a LocalVerifier (one forward each)."""
    v = LocalVerifier(target)
    v.open(prompt, GREEDY, seed)
    try:
        return [v.submit(drafts, version).result() for version, drafts in enumerate(sent)]
    finally:
        v.close()


def verdict(o: Outcome) -> tuple:
    return o.version, o.n_accepted, o.next_token, o.chain, o.accepted


def plain_greedy(target: Backend, prompt: list[int], n: int) -> list[int]:
    """n tokens of plain greedy decoding of the target, one forward per token."""
    seq = target.new_sequence()
    logits, out = target.forward(seq, prompt)[-1], []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = target.forward(seq, out[-1:])[-1]
    target.free_sequence(seq)
    return out


def tree_coverage(sent, outs) -> tuple[int, int]:
    """Tree rounds (several distinct chains) that accepted >= 2 tokens, and rounds that
    rejected a draft token (a correction)."""
    deep = rejected = 0
    for drafts, o in zip(sent, outs, strict=True):
        chains = {tuple(d.tokens) for d in drafts if d.tokens}
        deep += len(chains) > 1 and o.n_accepted >= 2
        rejected += o.n_accepted < max(len(c) for c in chains)
    return deep, rejected


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_tree_rounds_batched_equal_rounds_alone(setup, kind):
    tok, model, draft = setup
    target = TorchBackend(model, tok) if kind == "torch" else NumpyBackend.from_torch(model, tok)
    prompts = [PROMPT[: 5 + 4 * i] for i in range(3)]
    rounds = 6
    sent, outs, sizes = run_batched(
        target, prompts, DraftModelProposer(TorchBackend(draft, tok)), rounds
    )
    assert sizes == {len(prompts): rounds}  # every pass verified all three sessions
    for i, p in enumerate(prompts):
        alone = replay_alone(target, p, i, sent[i])
        assert [verdict(o) for o in outs[i]] == [verdict(o) for o in alone], f"session {i}"
        committed = [t for o in outs[i] for t in (*o.accepted, o.next_token)]
        assert committed == plain_greedy(target, p, len(committed))  # lossless
        deep, rejected = tree_coverage(sent[i], outs[i])
        assert deep >= 1 and rejected >= 1, (deep, rejected)


LLAMA_LOGIT_TOL = 2.0  # llama.cpp's batch-shape drift, as in tests/test_llamacpp_backend.py


def top2_gap(target: Backend, ids: list[int]) -> float:
    """The target's gap between its two largest next-token logits after ids."""
    seq = target.new_sequence()
    try:
        row = np.sort(target.forward(seq, ids)[-1].astype(np.float64))
    finally:
        target.free_sequence(seq)
    return float(row[-1] - row[-2])


@pytest.mark.integration
def test_tree_rounds_batched_equal_rounds_alone_llamacpp(smollm2_gguf):
    pytest.importorskip("llama_cpp")
    from specsplit.backends.llamacpp_backend import LlamaCppBackend

    target = LlamaCppBackend.load("smollm2-135m", n_ctx=512, threads=2, n_seq_max=4)
    drafter = LlamaCppBackend.load("smollm2-135m", n_ctx=512, threads=2, n_seq_max=1)
    texts = ["The capital of France is", "def fib(n):\n    ", "Once upon a time, in a small"]
    prompts = [target.tokenizer.encode(t) for t in texts]
    rounds = 6
    try:
        sent, outs, sizes = run_batched(target, prompts, DraftModelProposer(drafter), rounds)
        assert sizes == {len(prompts): rounds}
        for i, p in enumerate(prompts):
            alone = replay_alone(target, p, i, sent[i])
            done = list(p)  # committed ids while both agree
            for r, (a, b) in enumerate(zip(outs[i], alone, strict=True)):
                if verdict(a) != verdict(b):  # only a near tie may tell them apart
                    x, y = [*a.accepted, a.next_token], [*b.accepted, b.next_token]
                    j = next(
                        (j for j, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y))
                    )
                    gap = top2_gap(target, done + x[:j])
                    assert gap <= LLAMA_LOGIT_TOL, f"session {i} round {r}: gap {gap:.2f}"
                    break
                done += [*a.accepted, a.next_token]
            deep, rejected = tree_coverage(sent[i], outs[i])
            assert deep >= 1 and rejected >= 1, (deep, rejected)
    finally:
        drafter.close()
        target.close()
