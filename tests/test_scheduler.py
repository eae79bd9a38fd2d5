"""The batch scheduler on a tiny model: batched rounds equal single ones, KV budget eviction
and rebuild, chunked prefill that does not stall decoding sessions."""

from __future__ import annotations

import time

import pytest

from conftest import perturbed, tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.torch_backend import TorchBackend
from specsplit.engine.draft_length import FixedK
from specsplit.engine.scheduler import BatchScheduler, ScheduledVerifier
from specsplit.engine.speculative import DecodeLoop, GenerationRequest, SpeculativeEngine
from specsplit.errors import Overloaded
from specsplit.proposers.draft_model import DraftModelProposer
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
