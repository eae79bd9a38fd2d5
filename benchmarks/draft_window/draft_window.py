"""The drafter reading a long prompt's last W tokens only (``DraftModelProposer(window=W)``,
which exists at commit 3b72e26 only) against the whole prompt: bfloat16 Qwen 1.5B target on
torch, the IQ4_NL 0.5B drafter on llama.cpp, K auto, greedy, on the Spec-Bench categories
with long prompts (rag, summarization; 3 prompts each, as the committed report).

    cp benchmarks/draft_window/draft_window.py /tmp && git checkout 3b72e26
    python /tmp/draft_window.py [W ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from specsplit.backends.load import load_backend
from specsplit.bench.prompts import load_prompts
from specsplit.engine.speculative import GenerationRequest, SpeculativeEngine
from specsplit.faces.api import SpeculativeDecoder
from specsplit.proposers.draft_model import DraftModelProposer


def main() -> None:
    windows = [0] + [int(w) for w in sys.argv[1:] or ("256", "512")]
    ns = argparse.Namespace(
        suite="spec-bench",
        questions="../shared/data/spec_bench/question.jsonl",
        categories="rag,summarization",
        limit=3,
        humaneval_limit=None,
    )
    target = load_backend("torch", "qwen2.5-coder-1.5b", n_ctx=4096, dtype="bfloat16")
    draft = load_backend("llama.cpp", "qwen2.5-coder-0.5b-iq4_nl", n_ctx=4096)
    engines = {w: SpeculativeEngine(target, [DraftModelProposer(draft, window=w)]) for w in windows}
    encoder = SpeculativeDecoder(target, None, warm_up=False)
    prompts = load_prompts(ns)
    warm = encoder.encode_prompt(prompts[0].text)[:64]
    for e in engines.values():
        e.warm_up(warm)
    totals: dict[int, list[float]] = {w: [] for w in windows}
    for i, p in enumerate(prompts):
        ids = encoder.encode_prompt(p.text)
        order = windows[i % len(windows) :] + windows[: i % len(windows)]
        out, line = {}, f"{p.category[:5]} {len(ids)} tok:"
        for w in order:
            res = engines[w].generate(GenerationRequest(ids, 128))
            st, out[w] = res.stats, res.token_ids
            totals[w].append(st.t_total)
            line += (
                f"  W{w} total {st.t_total:.2f} ttft {st.t_first_token:.2f} drafter prefill "
                f"{st.t_prefill - st.t_first_token:.2f} tau {st.mean_accepted_length:.2f}"
                f" new {st.new_tokens}"
            )
        same = {w: out[w] == out[0] for w in windows[1:]}
        print(line, "same text:", same, flush=True)
    base = totals[0]
    for w in windows[1:]:
        ratios = [b / t for b, t in zip(base, totals[w], strict=True)]
        print(f"W{w}: whole prompt / window total time, median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
