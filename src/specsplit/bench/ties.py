"""Where a greedy text differs from the target's own, was it a near tie?

A backend whose logits depend on the batch shape (llama.cpp: up to ~1.4 logits between a
one-token pass and a K-token pass, see tests/test_llamacpp_backend.py) can flip the argmax
where the target's top two logits are closer than that. For every differing run this
records the first differing position and the target's top-2 logit gap there (from a
prefill of the prompt and the baseline's text up to it), so a report can tell a near tie
from a real divergence.

    python -m specsplit.bench.ties RUN_DIR   # annotates RUN_DIR/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# the largest batched-vs-single logit difference measured per backend, with a margin
# (torch bfloat16: up to 0.19 between a one-token and an 8-token pass of Qwen 1.5B;
# float16, with 3 more mantissa bits, gets the same bound unmeasured)
TIE_TOLERANCE = {
    "torch": 2e-3,
    "torch/bfloat16": 0.5,
    "torch/float16": 0.5,
    "llama.cpp": 2.0,
    "numpy": 1e-9,
}


def tie_tolerance(target: dict) -> float:
    """The tolerance for a results document's ``target`` (backend, and dtype if set)."""
    key = f"{target['backend']}/{target.get('dtype')}"
    return TIE_TOLERANCE.get(key, TIE_TOLERANCE.get(target["backend"], 0.0))


def top2_gap(target, ids: list[int]) -> float:  # noqa: ANN001 - a Backend
    """The target's top-2 logit gap after ids."""
    seq = target.new_sequence()
    try:
        logits = target.prefill(seq, ids)  # [V]
    finally:
        target.free_sequence(seq)
    top = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
    return float(top[1] - top[0])


def annotate(doc: dict, target, prompt_ids: dict[str, list[int]]) -> dict:  # noqa: ANN001
    """Add ``divergence[system] = {position, top2_gap, near_tie}`` to records whose greedy
    text differs from the baseline's (keeping the entries a record already has); returns
    the document."""
    tol = tie_tolerance(doc["target"])
    for rec in doc["prompts"]:
        if rec["id"] not in prompt_ids:  # kept from a resumed run, not among this run's prompts
            continue
        base = rec["results"][doc["baseline"]]["token_ids"]
        div = dict(rec.get("divergence") or {})
        for name, equal in rec["greedy_equal"].items():
            got = rec["results"].get(name, {}).get("token_ids")
            if equal is not False or got is None or name in div:
                continue
            n = next((i for i, (a, b) in enumerate(zip(base, got)) if a != b), None)
            if n is None:  # one text is a prefix of the other: EOS or length, not a token
                div[name] = {"position": min(len(base), len(got)), "top2_gap": None}
                div[name]["near_tie"] = False
                continue
            gap = top2_gap(target, prompt_ids[rec["id"]] + base[:n])
            div[name] = {"position": n, "top2_gap": gap, "near_tie": gap < tol}
        if div:
            rec["divergence"] = div
    doc["tie_tolerance"] = tol
    return doc


def main(argv: list[str] | None = None) -> int:
    from specsplit.backends.load import load_backend
    from specsplit.bench.prompts import load_prompts
    from specsplit.faces.api import SpeculativeDecoder

    ap = argparse.ArgumentParser(prog="bench_ties", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a bench output folder")
    ns = ap.parse_args(argv)
    path = Path(ns.run) / "results.json"
    doc = json.loads(path.read_text())
    cfg = argparse.Namespace(**doc["config"])
    spec = doc["target"]
    target = load_backend(spec["backend"], spec["name"], n_ctx=4096, dtype=spec.get("dtype"))
    encoder = SpeculativeDecoder(target, None, warm_up=False)
    ids = {p.id: encoder.encode_prompt(p.text) for p in load_prompts(cfg)}
    annotate(doc, target, ids)
    path.write_text(json.dumps(doc, indent=1))
    n = sum(len(r.get("divergence", {})) for r in doc["prompts"])
    ties = sum(d["near_tie"] for r in doc["prompts"] for d in r.get("divergence", {}).values())
    print(f"{n} differing runs, {ties} at a near tie (top-2 gap < {doc['tie_tolerance']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
