"""The systems `specsplit bench` compares: each generates one prompt greedily and reports
its figures in the same words (docs/bench_results.md, DESIGN.md "Words and figures").

Counting is the same for every system: the new ids exclude EOS but ``new_tokens`` counts
it as one token; the bonus or correction token of a round is a new token, never a draft
token; passes are target forward passes after the prompt's prefill. No system keeps a
cache of an earlier run: every run starts from an empty KV cache and drafters are reset.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from specsplit.backends.base import Tokenizer
from specsplit.engine.speculative import DecodeLoop, GenerationRequest, SpeculativeEngine
from specsplit.errors import ConfigError


@dataclass
class System:
    """One way of generating. ``kind`` as in the results schema."""

    name: str
    kind: str
    drafter: str | None = None
    rtt_ms: float | None = None
    note: str = ""

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "drafter": self.drafter,
            "rtt_ms": self.rtt_ms,
            "note": self.note,
        }

    def run(self, ids: list[int], max_new: int) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _timed(new: list[int], hit_eos: bool, t_first: float | None, total: float) -> dict:
    """The figures every system reports, from its ids and clock."""
    n = len(new) + int(hit_eos)
    t_first = total if t_first is None else t_first
    return {
        "token_ids": new,
        "new_tokens": n,
        "total_s": total,
        "tokens_per_s": n / total if total > 0 else 0.0,
        "decode_tokens_per_s": (n - 1) / (total - t_first) if n > 1 and total > t_first else 0.0,
        "time_to_first_token_s": t_first,
    }


def _with_counts(res: dict, passes: int, proposed: int | None) -> dict:
    """Add pass and draft counts of a system that only reports its forward passes (after
    the prefill) and its draft tokens: each pass emits its accepted draft tokens plus one,
    and the prefill emits the first token, so accepted = new - 1 - passes."""
    passes = max(0, passes)
    res.update(
        target_passes=passes, mean_accepted_length=res["new_tokens"] / passes if passes else None
    )
    if proposed is not None:
        accepted = max(0, res["new_tokens"] - 1 - passes)
        res.update(
            proposed=proposed,
            accepted=accepted,
            acceptance_rate=accepted / proposed if proposed else None,
        )
    return res


def _engine_figures(res, wire: tuple[int, int] | None = None) -> dict:  # noqa: ANN001
    """Figures of a DecodeLoop result (``wire``: bytes up and down counted by a proxy)."""
    st = res.stats
    d = st.as_dict()
    out = _timed(res.token_ids, res.finish_reason == "eos", st.t_first_token, st.t_total)
    keys = (
        "target_passes proposed accepted acceptance_rate mean_accepted_length "
        "per_position_acceptance draft_lengths draft_asked round_trips dropped_draft_tokens"
    ).split()
    out.update({k: d[k] for k in keys})
    out.update(
        pos_proposed=list(st.pos_proposed),
        pos_accepted=list(st.pos_accepted),
        draft_s=st.t_draft,
        verify_s=st.t_verify,
        network_s=st.t_network,
        queue_s=st.t_queue,
        prefill_s=st.t_prefill,
    )
    if wire is not None:
        out["bytes_per_token"] = sum(wire) / max(1, out["new_tokens"])
    if not st.proposed:  # no drafting: nothing to accept
        out["acceptance_rate"] = None
    return out


class EngineSystem(System):
    """specsplit in this process: the target alone (no drafter) or with drafters."""

    def __init__(self, name: str, kind: str, engine: SpeculativeEngine, drafter: str | None):
        super().__init__(name, kind, drafter)
        self.engine = engine

    def run(self, ids: list[int], max_new: int) -> dict:
        for p in self.engine.proposers:
            p.reset()
        return _engine_figures(self.engine.generate(GenerationRequest(ids, max_new)))


class EdgeSystem(System):
    """specsplit edge-cloud: drafts here, verified by a server behind a delaying proxy."""

    def __init__(self, name: str, loop: DecodeLoop, proxy, drafter: str, rtt_ms: float):  # noqa: ANN001
        super().__init__(name, "edge-cloud", drafter, rtt_ms)
        self.loop, self.proxy = loop, proxy

    def run(self, ids: list[int], max_new: int) -> dict:
        for p in self.loop.proposers:
            p.reset()
        self.proxy.reset_counters()
        res = self.loop.generate(GenerationRequest(ids, max_new))
        return _engine_figures(res, (self.proxy.bytes_up, self.proxy.bytes_down))

    def close(self) -> None:
        self.loop.verifier.shutdown()


class CloudSystem(System):
    """Cloud-only: the server generates alone and streams its tokens through the proxy."""

    def __init__(self, name: str, proxy, fingerprint: str, rtt_ms: float):  # noqa: ANN001
        super().__init__(name, "cloud-only", None, rtt_ms)
        self.proxy, self.fingerprint = proxy, fingerprint

    def run(self, ids: list[int], max_new: int) -> dict:
        from specsplit.transport.client import generate_cloud

        self.proxy.reset_counters()
        new: list[int] = []
        t_first, eos = None, False
        t0 = time.perf_counter()
        for c in generate_cloud(
            f"127.0.0.1:{self.proxy.port}",
            self.fingerprint,
            prompt_ids=ids,
            max_new_tokens=max_new,
        ):
            if (c.token_ids or c.result) and t_first is None:
                t_first = time.perf_counter() - t0
            new += list(c.token_ids)
            eos = eos or (c.result is not None and c.result.finish_reason == "eos")
        out = _timed(new, eos, t_first, time.perf_counter() - t0)
        out["bytes_per_token"] = (self.proxy.bytes_up + self.proxy.bytes_down) / max(
            1, out["new_tokens"]
        )
        return out


class _FirstTokenClock:
    """A transformers streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.t0, self.first, self._puts = time.perf_counter(), None, 0

    def put(self, value) -> None:  # noqa: ANN001
        self._puts += 1
        if self._puts == 2 and self.first is None:  # the first put is the prompt
            self.first = time.perf_counter() - self.t0

    def end(self) -> None:
        pass


class HFSystem(System):
    """Hugging Face ``generate``: assisted generation (a draft model) or prompt lookup, on
    the same torch model object the target backend holds. Passes are counted with a hook on
    the target's forward, drafts by wrapping the candidate generator."""

    def __init__(
        self, name: str, model, eos_ids: Sequence[int], assistant=None, prompt_lookup: int = 0
    ):  # noqa: ANN001
        drafter = "prompt-lookup" if prompt_lookup else "assistant"
        super().__init__(name, "hf", drafter)
        if model is None:
            raise ConfigError("HF systems need the torch target backend")
        self.model, self.eos = model, list(eos_ids)
        self.assistant, self.prompt_lookup = assistant, prompt_lookup
        self._calls = 0
        self._proposed = 0
        model.register_forward_pre_hook(self._count)
        original = model._get_candidate_generator

        def wrapped(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            gen = original(*a, **kw)
            inner = gen.get_candidates

            def get_candidates(input_ids, *a2, **kw2):  # noqa: ANN001, ANN002, ANN003, ANN202
                cand = inner(input_ids, *a2, **kw2)
                self._proposed += cand[0].shape[-1] - input_ids.shape[-1]
                return cand

            gen.get_candidates = get_candidates
            return gen

        model._get_candidate_generator = wrapped

    def _count(self, *_a) -> None:  # noqa: ANN002
        self._calls += 1

    def run(self, ids: list[int], max_new: int) -> dict:
        import torch

        m = self.model
        x = torch.tensor([list(ids)], device=m.device)
        kw = dict(
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=self.eos,
            pad_token_id=self.eos[0],
            attention_mask=torch.ones_like(x),
        )
        if self.assistant is not None:
            kw["assistant_model"] = self.assistant
        if self.prompt_lookup:
            kw["prompt_lookup_num_tokens"] = self.prompt_lookup
        self._calls = self._proposed = 0
        clock = _FirstTokenClock()
        with torch.inference_mode():
            out = m.generate(x, streamer=clock, **kw)
        total = time.perf_counter() - clock.t0
        new = out[0, len(ids) :].tolist()
        hit = next((i for i, t in enumerate(new) if t in self.eos), None)
        if hit is not None:
            new = new[:hit]
        res = _timed(new, hit is not None, clock.first, total)
        return _with_counts(res, self._calls - 1, self._proposed)


class LlamaCppPythonSystem(System):
    """llama-cpp-python's own ``Llama.generate`` on the same GGUF, greedy, alone or with
    its prompt-lookup drafter (``LlamaPromptLookupDecoding``)."""

    def __init__(self, name: str, gguf: Path, threads: int | None, n_ctx: int, lookup: int = 0):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        super().__init__(name, "llama-cpp-python", "prompt-lookup" if lookup else None)
        self._passes = self._proposed = 0
        draft = None
        if lookup:
            pld = LlamaPromptLookupDecoding(num_pred_tokens=lookup)

            def counted(input_ids, **kw):  # noqa: ANN001, ANN003, ANN202
                d = pld(input_ids, **kw)
                self._proposed += len(d)
                return d

            draft = _Draft(counted)
        self.llm = Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            draft_model=draft,
            logits_all=lookup > 0,  # with a drafter it keeps logits for every position; the
            verbose=False,  # buffer is sized by this flag (n_batch rows otherwise)
        )
        self.eos = {self.llm.token_eos()}
        original = self.llm.eval

        def eval_counted(tokens):  # noqa: ANN001, ANN202
            self._passes += 1
            return original(tokens)

        self.llm.eval = eval_counted

    def run(self, ids: list[int], max_new: int) -> dict:
        self.llm.reset()  # no prefix reuse from an earlier run
        self._passes = self._proposed = 0
        new: list[int] = []
        t0 = time.perf_counter()
        t_first, eos = None, False
        for tok in self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
            if t_first is None:
                t_first = time.perf_counter() - t0
            if tok in self.eos:
                eos = True
                break
            new.append(int(tok))
            if len(new) >= max_new:
                break
        res = _timed(new, eos, t_first, time.perf_counter() - t0)
        drafts = self._proposed if self.llm.draft_model is not None else None
        return _with_counts(res, self._passes - 1, drafts)

    def close(self) -> None:
        self.llm.close()


def _Draft(fn: Callable):  # noqa: ANN202, N802
    """A LlamaDraftModel calling fn."""
    from llama_cpp.llama_speculative import LlamaDraftModel

    class _Fn(LlamaDraftModel):
        def __call__(self, input_ids, /, **kw):  # noqa: ANN001, ANN003, ANN204
            return fn(input_ids, **kw)

    return _Fn()


LLAMA_SPECULATIVE_DRAFT = 3  # its --spec-draft-n-max default


@dataclass
class LlamaSpeculativeSystem(System):
    """llama.cpp's own ``llama-speculative`` binary, one process per prompt, greedy, with the
    same threads for target and draft as the other systems and its default draft length.

    It takes text: the prompt ids are detokenized with their special tokens as text, which it
    tokenizes back parsing special tokens (checked: its prompt token count must equal ours)
    and with escape processing off (``\\n`` in code stays two characters). It prints the
    prompt and then the generated text: the text after the prompt is tokenized with the
    target's tokenizer (no special tokens added), cut at the first EOS and at ``max_new``, so
    its ids are compared like every system's. The figures are the ones it prints (model load
    and warm-up excluded); ``llama_speculative_figures`` says how they are counted."""

    kind: str = "llama-speculative"
    binary: str = ""
    target_gguf: str = ""
    draft_gguf: str = ""
    threads: int = 1
    n_ctx: int = 4096
    draft_max: int = LLAMA_SPECULATIVE_DRAFT
    tokenizer: Tokenizer | None = None  # the target's
    extra: list[str] = field(default_factory=list)
    note: str = (
        "llama.cpp's llama-speculative, one process per prompt; its token ids are the target "
        "tokenizer's ids of the text it printed (re-tokenized)"
    )

    def command(self, prompt: str, max_new: int) -> list[str]:
        t = str(self.threads)
        return [
            self.binary, "-m", self.target_gguf, "-md", self.draft_gguf,
            "-p", prompt, "--no-escape", "-c", str(self.n_ctx),
            "-n", str(max(0, max_new - 1)),  # it stops once it has generated more than -n
            "--temp", "0", "--spec-draft-n-max", str(self.draft_max), "--color", "off",
            "-t", t, "-tb", t, "-td", t, "-tbd", t, *self.extra,
        ]  # fmt: skip

    def run(self, ids: list[int], max_new: int) -> dict:
        if self.tokenizer is None:
            raise ConfigError("llama-speculative needs the target's tokenizer")
        prompt = self.tokenizer.decode(ids)
        p = subprocess.run(self.command(prompt, max_new), capture_output=True, timeout=3600)
        stdout = p.stdout.decode("utf-8", errors="replace")
        stderr = p.stderr.decode("utf-8", errors="replace")
        if p.returncode != 0:
            raise RuntimeError(f"llama-speculative failed ({p.returncode}): {stderr[-300:]}")
        raw = parse_llama_speculative(stdout, stderr, prompt)
        if raw["prompt_tokens"] != len(ids):
            raise RuntimeError(
                f"llama-speculative read the prompt as {raw['prompt_tokens']} tokens, not "
                f"{len(ids)}: the comparison would not be on the same prompt"
            )
        new = self.tokenizer.encode(raw["text"], add_special=False)
        return llama_speculative_figures(raw, new, self.tokenizer.eos_token_ids, max_new)


def parse_llama_speculative(stdout: str, stderr: str, prompt: str) -> dict:
    """What llama-speculative printed: on stdout two newlines, the prompt, the generated
    text (EOS as its text), four newlines; on stderr "encoded N tokens in T seconds",
    "decoded N tokens in T seconds", "n_draft = ", "n_predict = ", "n_drafted = ",
    "n_accept = " (with or without a log prefix). Raises if something is missing."""

    def num(pattern: str) -> float:
        m = re.search(pattern, stderr)
        if m is None:
            raise ValueError(f"llama-speculative output has no {pattern!r}")
        return float(m.group(1))

    head, tail = "\n\n" + prompt, "\n\n\n\n"
    if not stdout.startswith(head) or not stdout.endswith(tail):
        raise ValueError("llama-speculative did not echo the prompt it was given")
    return {
        "text": stdout[len(head) : len(stdout) - len(tail)],
        "prompt_tokens": int(num(r"encoded\s+(\d+)\s+tokens")),
        "encode_s": num(r"encoded\s+\d+\s+tokens\s+in\s+([\d.]+)\s+seconds"),
        "decode_s": num(r"decoded\s+\d+\s+tokens\s+in\s+([\d.]+)\s+seconds"),
        "n_predict": int(num(r"n_predict\s*=\s*(\d+)")),
        "n_draft": int(num(r"n_draft\s*=\s*(\d+)")),
        "n_drafted": int(num(r"n_drafted\s*=\s*(\d+)")),
        "n_accept": int(num(r"n_accept\s*=\s*(\d+)")),
    }


def llama_speculative_figures(
    raw: dict, ids: list[int], eos_ids: frozenset[int] | set[int], max_new: int
) -> dict:
    """A run's figures from what llama-speculative printed (``raw``) and the ids of its text.

    The ids are cut at the first EOS and at ``max_new`` and counted like every system's. It
    generates whole rounds, so it may pass ``max_new`` by up to its draft length: the time
    to the last counted token is its prefill ("encoded") time plus the share of its decode
    time those tokens take. Passes, draft tokens and acceptance are its own counts over
    everything it generated: each round emits its accepted draft tokens plus one, and the
    prefill the first token, so passes = n_predict - 1 - n_accept."""
    hit = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    new = list(ids[: hit if hit is not None else len(ids)])
    eos = hit is not None and hit < max_new
    new = new[:max_new]
    n = len(new) + int(eos)
    share = min(1.0, n / raw["n_predict"]) if raw["n_predict"] else 1.0
    res = _timed(new, eos, raw["encode_s"], raw["encode_s"] + share * raw["decode_s"])
    passes = max(0, raw["n_predict"] - 1 - raw["n_accept"])
    res.update(
        target_passes=passes,
        proposed=raw["n_drafted"],
        accepted=raw["n_accept"],
        acceptance_rate=raw["n_accept"] / raw["n_drafted"] if raw["n_drafted"] else None,
        mean_accepted_length=raw["n_predict"] / passes if passes else None,
        reported={k: v for k, v in raw.items() if k != "text"},
    )
    return res
