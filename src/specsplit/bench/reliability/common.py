"""What the reliability benchmarks share: `specsplit serve` subprocesses that can be killed and
restarted on their port, clients (edge or cloud-only) that log when each token came, recorded
drafts to replay, and the comparison of a generation with its reference."""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np

from specsplit.bench.split import _scrape, chat_ids, free_port, rss_bytes, start_server, stop_server
from specsplit.engine.draft_length import FixedK
from specsplit.engine.speculative import Chunk, DecodeLoop, GenerationRequest, default_policy
from specsplit.errors import SpecsplitError
from specsplit.proposers.base import Draft, Proposer
from specsplit.sampling import SamplingParams
from specsplit.transport import wire

QUESTIONS = "../shared/data/spec_bench/question.jsonl"


# ---- servers ----


class Server:
    """One `specsplit serve` subprocess on fixed gRPC and HTTP ports (restartable on them)."""

    def __init__(self, name: str, args: Sequence[str], out: Path) -> None:
        self.name, self.args, self.out = name, list(args), out
        self.port, self.http_port = free_port(), free_port()
        self.proc = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start it (again, on the same ports); returns the seconds until it listened."""
        t0 = time.monotonic()
        log = self.out / f"server_{self.name}_{self.starts}.log"
        self.proc = start_server([*self.args, "--http-port", str(self.http_port)], self.port, log)
        self.starts += 1
        return time.monotonic() - t0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> float:
        """SIGKILL it; returns the monotonic time of the kill."""
        assert self.proc is not None
        t = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return t

    def metrics(self) -> dict:
        return _scrape(self.http_port)

    def sessions(self) -> int:
        """Open sessions (0 if the server does not answer)."""
        try:
            return int(self.metrics()["sessions"])
        except OSError:
            return 0

    def rss(self) -> int:
        assert self.proc is not None
        return rss_bytes(self.proc.pid)[0]

    def stop(self) -> None:
        if self.alive():
            stop_server(self.proc)

    def drained(self, timeout: float = 30.0) -> bool:
        """Whether every session ended within timeout seconds (none leaked)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive() and self.sessions() == 0:
                return True
            time.sleep(0.5)
        return False


def serve_args(ns: argparse.Namespace, *extra: str) -> list[str]:
    """`specsplit serve` flags: the target, no per-address rate limit (every client of these
    benchmarks is 127.0.0.1, so they would share one bucket), then extra."""
    return ["--target", ns.target, "--target-backend", ns.target_backend, "--rate", "0", *extra]


# ---- prompts and requests ----


@dataclass(frozen=True)
class Request:
    """One generation a client asks for."""

    index: int  # in its client's list
    prompt: str  # the prompt's id
    prompt_ids: tuple[int, ...]  # [n] chat template applied
    max_new_tokens: int
    seed: int


def load_prompt_ids(ns: argparse.Namespace, tokenizer) -> list[tuple[str, list[int]]]:  # noqa: ANN001
    """(id, chat ids) of the first --per-category Spec-Bench questions of --categories."""
    from specsplit.bench.prompts import load_spec_bench

    cats = ns.categories.split(",") if ns.categories else None
    prompts = load_spec_bench(ns.questions, cats, ns.per_category)
    return [(p.id, chat_ids(tokenizer, p.text)) for p in prompts]


# ---- clients ----


@dataclass(frozen=True)
class ClientSpec:
    """One client: how it drafts and samples."""

    name: str
    drafter: (
        str  # "ngram", "model" (the draft model), "replay" (recorded drafts), "none" (cloud-only)
    )
    temperature: float = 0.0
    k: int | None = None  # a fixed K (a sampled text replays only with one); None: automatic

    @property
    def cloud(self) -> bool:
        return self.drafter == "none"


class Client:
    """Runs requests one after another against a list of servers (an edge client with a
    drafter here and a ``RemoteVerifier``, or cloud-only with ``Generate``) and logs the time
    of every chunk of tokens."""

    def __init__(
        self,
        spec: ClientSpec,
        servers: Sequence[str],
        tokenizer,  # noqa: ANN001
        *,
        draft: Proposer | None = None,  # the proposer of a "model" or "replay" client
        retry_for: float = 30.0,
        record: bool = False,  # keep each request's drafts in its record (``Recorder``)
    ) -> None:
        from specsplit.proposers.ngram import NGramProposer
        from specsplit.transport.client import RemoteVerifier

        self.spec, self.servers, self.tokenizer = spec, list(servers), tokenizer
        self.params = SamplingParams(temperature=spec.temperature)
        self.retry_for = retry_for
        self._live = None  # the verifier or cloud run of the request in progress
        self.last_token = 0.0  # monotonic time of the last chunk with tokens
        self.verifier = None
        self.proposer = draft
        self.recorder: Recorder | None = None
        if not spec.cloud:
            self.verifier = RemoteVerifier(self.servers, tokenizer, retry_for=retry_for)
            if spec.drafter == "ngram":
                self.proposer = NGramProposer()
            assert self.proposer is not None, f"client {spec.name} needs its drafter"
            if record:
                self.recorder = Recorder(self.proposer)
            policy = (
                FixedK(spec.k) if spec.k is not None else default_policy([self.proposer], None, 16)
            )
            # replayed drafts exist for the contexts recorded only: no drafting ahead
            pipeline = False if spec.drafter == "replay" else None
            proposers = [self.recorder or self.proposer]
            self.loop = DecodeLoop(self.verifier, proposers, policy, pipeline)

    def where(self) -> str | None:
        """The server the request in progress uses (None between requests)."""
        live = self._live
        if live is None:
            return None
        return live.link.address if live is self.verifier else live.failover.address

    def run(self, req: Request) -> dict:
        """One request; its ids, finish and error, and (monotonic time, tokens) per chunk."""
        rec: dict = {
            "client": self.spec.name,
            "request": req.index,
            "prompt": req.prompt,
            "t0": time.monotonic(),
            "chunks": [],
            "ids": [],
            "error": None,
        }
        result = None
        try:
            for chunk in self._chunks(req):
                if chunk.token_ids:
                    self.last_token = time.monotonic()
                    rec["chunks"].append((self.last_token, len(chunk.token_ids)))
                rec["ids"] += [int(t) for t in chunk.token_ids]
                result = chunk.result or result
        except SpecsplitError as e:  # Interrupted (no server left), refusals
            rec["error"] = f"{type(e).__name__}: {e}"
        finally:
            self._live = None
        rec["t1"] = time.monotonic()
        if self.recorder is not None:
            rec["drafts"] = {str(n): d for n, d in self.recorder.drafts.items()}
        if result is not None:
            rec["finish"] = result.finish_reason
            rec["stream_equals_result"] = rec["ids"] == result.token_ids
            rec["ids"] = list(result.token_ids)
            rec["reconnects"] = result.stats.reconnects
        elif rec["error"] is None:
            rec["error"] = "the stream ended without a result"
        return rec

    def _chunks(self, req: Request) -> Iterator[Chunk]:
        if self.spec.cloud:
            yield from self._cloud(req)
            return
        if isinstance(self.proposer, Replayer):
            self.proposer.use(req.prompt, self.spec.temperature)
        if self.recorder is not None:
            self.recorder.drafts = {}
        self._live = self.verifier
        yield from self.loop.stream(
            GenerationRequest(req.prompt_ids, req.max_new_tokens, self.params, req.seed)
        )

    def _cloud(self, req: Request) -> Iterator[Chunk]:
        """Cloud-only, as ``transport.client.generate_cloud`` runs it; the run object is kept
        to tell which server the request is on at any moment."""
        from specsplit.transport.cloud import _CloudRun
        from specsplit.transport.pb import specsplit_pb2 as pb

        request = pb.GenerateRequest(
            prompt_ids=list(req.prompt_ids),
            sampling=wire.sampling_to_pb(self.params),
            seed=req.seed,
            max_new_tokens=req.max_new_tokens,
        )
        run = _CloudRun(self.servers, self.retry_for)
        self._live = run
        yield from run.stream(request, self.tokenizer.fingerprint(), None, None, None)

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.shutdown()


def model_drafter(ns: argparse.Namespace) -> Proposer:
    """The draft model as an edge client runs it (sampled q quantized to cross the wire)."""
    from specsplit.backends.load import load_backend
    from specsplit.proposers.draft_model import DraftModelProposer

    backend = load_backend(ns.draft_backend, ns.draft, threads=1, n_ctx=2048)
    return DraftModelProposer(backend, top_m=64, quantize=True)


# ---- recorded drafts ----


class Recorder(Proposer):
    """Wraps a drafter; keeps each draft (tokens and quantized q rows) by its context length."""

    def __init__(self, inner: Proposer) -> None:
        self.inner, self.name = inner, inner.name
        self.drafts: dict[int, dict] = {}

    def propose(self, context, k, params, u) -> Draft:  # noqa: ANN001
        d = self.inner.propose(context, k, params, u)
        rows = None
        if d.q is not None:
            rows = [[list(r.ids), list(r.counts)] for r in map(wire.q_row_to_pb, d.q)]
        self.drafts[len(context)] = {"tokens": [int(t) for t in d.tokens], "q": rows}
        return d


class Replayer(Proposer):
    """Sends the drafts recorded for a request (no model: the client costs no CPU); nothing
    once the text has left the recorded one."""

    name = "replay"

    def __init__(self, recordings: dict[str, dict], vocab: int) -> None:
        self.recordings, self.vocab = recordings, vocab  # "prompt@temperature" -> recording
        self.text: list[int] = []
        self.drafts: dict[str, dict] = {}

    @staticmethod
    def key(prompt: str, temperature: float) -> str:
        return f"{prompt}@{temperature:g}"

    def use(self, prompt: str, temperature: float) -> None:
        rec = self.recordings[self.key(prompt, temperature)]
        self.text = rec["prompt_ids"] + rec["output_ids"]
        self.drafts = rec["drafts"]

    def propose(self, context, k, params, u) -> Draft:  # noqa: ANN001
        n = len(context)
        d = self.drafts.get(str(n))
        if d is None or list(context) != self.text[:n]:
            return Draft([])
        tokens = d["tokens"][:k]
        if d["q"] is None or not tokens:
            return Draft(tokens)
        q = np.zeros((len(tokens), self.vocab))  # [k, V], exactly counts / 2**16
        for i, (ids, counts) in enumerate(d["q"][: len(tokens)]):
            q[i, ids] = np.asarray(counts, dtype=np.float64) / wire.Q_TOTAL
        return Draft(tokens, q)


# ---- figures ----


def compare(ref: Sequence[int], got: Sequence[int]) -> dict:
    """How a generation differs from its reference: equal; or tokens only lost or only
    duplicated (everything else in place); or changed from a position on."""
    ref, got = list(ref), list(got)
    if ref == got:
        return {"equal": True, "lost": 0, "duplicated": 0}
    ops = [op for op in SequenceMatcher(None, ref, got, autojunk=False).get_opcodes()]
    diff = [op for op in ops if op[0] != "equal"]
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    out = {"equal": False, "position": first, "lost": 0, "duplicated": 0, "changed": False}
    if all(op[0] == "delete" for op in diff):
        out["lost"] = sum(i2 - i1 for _, i1, i2, _, _ in diff)
    elif all(op[0] == "insert" for op in diff):
        out["duplicated"] = sum(j2 - j1 for _, _, _, j1, j2 in diff)
    else:
        out["changed"] = True
    return out


def pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def tbt(chunks: Sequence[tuple[float, int]]) -> tuple[list[float], list[float]]:
    """Per token: the wait for the chunk it came in, shared by the chunk's tokens (as
    ``split.throughput`` counts it); and the raw waits between chunks."""
    per_token, gaps = [], []
    for (t0, _), (t1, n) in zip(chunks, chunks[1:]):
        gaps.append(t1 - t0)
        per_token += [(t1 - t0) / n] * n
    return per_token, gaps


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def spec_dicts(specs: Sequence[ClientSpec]) -> list[dict]:
    return [asdict(s) for s in specs]


def decision_margin(
    target,  # noqa: ANN001 - a Backend
    temperature: float,
    seed: int,
    prompt_ids: Sequence[int],
    text: Sequence[int],
    drafts: dict[str, dict],
    position: int,
) -> dict:
    """How close the sampled decision for text[position] was to going the other way, on this
    process's (unbatched) target: for a generation whose recorded drafts are known and whose
    text differs from the recorded one there. The margin of an accept test is |u - p(x)/q(x)|;
    of a draw, the distance from u to the nearest edge of the drawn token's interval."""
    from specsplit.randomness import SAMPLE, verifier_uniform
    from specsplit.sampling import logits_to_probs
    from specsplit.verify import _residual

    full = [*prompt_ids, *text]
    at = len(prompt_ids) + position  # the decision's position in the whole text
    c = len(prompt_ids)  # rounds along the recorded text: the committed length of each
    tokens: list[int] = []
    rows = None
    while True:
        d = drafts.get(str(c)) or {"tokens": [], "q": None}
        tokens, rows = d["tokens"], d["q"]
        n = 0
        while n < len(tokens) and c + n < len(full) and tokens[n] == full[c + n]:
            n += 1
        if c + n >= at:
            break
        c += n + 1
    seq = target.new_sequence()
    try:
        logits = target.prefill(seq, full[:at])  # [V] for the token at `at`
    finally:
        target.free_sequence(seq)
    from specsplit.sampling import SamplingParams

    p = logits_to_probs(np.asarray(logits), SamplingParams(temperature=temperature))  # [V]
    u = verifier_uniform(seed)
    out: dict = {"round_at": c, "draft_index": at - c}

    def draw_margin(probs: np.ndarray, v: float) -> float:
        cdf = np.cumsum(probs)
        x = v * cdf[-1]
        i = int(np.searchsorted(cdf, x, side="right"))
        lo = cdf[i - 1] if i > 0 else 0.0
        return float(min(x - lo, cdf[min(i, len(cdf) - 1)] - x) / cdf[-1])

    i = at - c
    if i < len(tokens):
        x = tokens[i]
        q = np.zeros_like(p)
        if rows is None:
            q[x] = 1.0
        else:
            ids, counts = rows[i]
            q[ids] = np.asarray(counts, dtype=np.float64) / wire.Q_TOTAL
        ratio = p[x] / q[x]
        out["accept_margin"] = float(abs(u(at, 0) - ratio))
        out["draw_margin"] = draw_margin(_residual(p, q), u(at, SAMPLE))
    else:
        out["draw_margin"] = draw_margin(p, u(at, SAMPLE))
    return out
