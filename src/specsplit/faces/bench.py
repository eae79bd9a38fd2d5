"""`specsplit bench`: the target alone against speculation, interleaved, on real prompts.

Every system runs every prompt once per repeat, in a rotating order, after a warm-up;
tokens/s counts from the request's arrival (prefill included) to its last token, and the
speedup of a prompt is its tokens/s over the baseline's on the same prompt in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from specsplit.engine.speculative import GenerationRequest, SpeculativeEngine


@dataclass
class System:
    """One way of generating: an engine, or a Hugging Face generate call."""

    name: str
    engine: SpeculativeEngine | None = None
    hf: dict | None = None  # {"assistant": model or None, "prompt_lookup": int}


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run_one(system: System, target, ids: list[int], max_new: int) -> dict:
    """Run one prompt on one system; return its figures and ids."""
    if system.engine is not None:
        res = system.engine.generate(GenerationRequest(ids, max_new))
        return {
            "token_ids": res.token_ids,
            "finish_reason": res.finish_reason,
            **res.stats.as_dict(),
        }
    from specsplit.faces.hf_baselines import hf_generate

    new, dt, hit_eos = hf_generate(
        getattr(target, "model", None),
        ids,
        max_new,
        sorted(target.tokenizer.eos_token_ids),
        assistant=system.hf.get("assistant"),
        prompt_lookup=system.hf.get("prompt_lookup", 0),
    )
    n = len(new) + hit_eos  # count EOS as generated, as the engine's statistics do
    return {"token_ids": new, "new_tokens": n, "tokens_per_s": n / dt, "total_s": dt}


def summarise(records: list[dict], systems: list[str], baseline: str) -> dict:
    """Medians per system, overall and per category, with speedups from the same prompts."""

    def block(rs: list[dict]) -> dict:
        out = {}
        for s in systems:
            rows = [r["results"][s] for r in rs if s in r["results"]]
            speed = [
                r["results"][s]["tokens_per_s"] / r["results"][baseline]["tokens_per_s"]
                for r in rs
                if s in r["results"] and r["results"][baseline]["tokens_per_s"] > 0
            ]
            out[s] = {
                "prompts": len(rows),
                "median_tokens_per_s": _median([x["tokens_per_s"] for x in rows]),
                "median_decode_tokens_per_s": _median([x.get("decode_tokens_per_s") for x in rows]),
                "median_speedup": _median(speed),
                "median_acceptance_rate": _median([x.get("acceptance_rate") for x in rows]),
                "median_mean_accepted_length": _median(
                    [x.get("mean_accepted_length") for x in rows]
                ),
                "greedy_equal_to_target": all(r["greedy_equal"].get(s, True) for r in rs),
                "draft_length_histogram": _hist(
                    [k for x in rows for k in x.get("draft_lengths", [])]
                ),
            }
        return out

    cats = sorted({r["category"] for r in records})
    return {
        "overall": block(records),
        "per_category": {c: block([r for r in records if r["category"] == c]) for c in cats},
    }


def _hist(ks: list[int]) -> dict[str, int]:
    return {str(k): ks.count(k) for k in sorted(set(ks))}


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmark the target alone against speculation")
    b.add_argument("--suite", choices=["spec-bench", "humaneval"], required=True)
    b.add_argument(
        "--questions", default="../shared/data/spec_bench/question.jsonl", help="Spec-Bench jsonl"
    )
    b.add_argument("--categories", default=None, help="comma-separated Spec-Bench categories")
    b.add_argument("--limit", type=int, default=None, help="prompts (per category for Spec-Bench)")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--target", default="qwen2.5-coder-1.5b")
    b.add_argument("--target-backend", default="torch", choices=["torch", "llama.cpp", "numpy"])
    b.add_argument("--draft", action="append", default=None, help="drafter(s) for the spec system")
    b.add_argument("--draft-backend", default="llama.cpp", choices=["torch", "llama.cpp", "numpy"])
    b.add_argument("--target-threads", type=int, default=None)
    b.add_argument("--draft-threads", type=int, default=None)
    b.add_argument("--k", default="auto", help="K of the spec system: a number or auto")
    b.add_argument(
        "--also-draft-backend",
        default=None,
        choices=["torch", "llama.cpp", "numpy"],
        help="add a spec system with the first draft model on this backend too",
    )
    b.add_argument("--k-sweep", default="", help="also fixed-K systems, e.g. 0,2,4,8")
    b.add_argument(
        "--hf", default="", help="HF systems: assisted, assisted-torch-draft, prompt-lookup"
    )
    b.add_argument("--out", required=True, help="output folder for results.json")
    b.set_defaults(func=cmd_bench)


def build_systems(ns, target) -> list[System]:
    from specsplit.faces.api import DEFAULT_DRAFT, make_proposer
    from specsplit.faces.cli import _parse_k

    drafts = ns.draft or [DEFAULT_DRAFT]
    proposers = [
        make_proposer(d, target, ns.draft_backend, threads=ns.draft_threads) for d in drafts
    ]
    proposers = [p for p in proposers if p is not None]
    label = "+".join(drafts)
    systems = [System("target", SpeculativeEngine(target))]
    k = _parse_k(ns.k)
    systems.append(System(f"spec[{label},k={ns.k}]", SpeculativeEngine(target, proposers, k=k)))
    if ns.also_draft_backend:
        other = make_proposer(drafts[0], target, ns.also_draft_backend, threads=ns.draft_threads)
        name = f"spec[{drafts[0]}@{ns.also_draft_backend},k={ns.k}]"
        systems.append(System(name, SpeculativeEngine(target, [other], k=k)))
    for kk in [int(x) for x in ns.k_sweep.split(",") if x.strip()]:
        systems.append(System(f"spec[{label},k={kk}]", SpeculativeEngine(target, proposers, k=kk)))
    hf = [h for h in ns.hf.split(",") if h]
    if hf:
        from specsplit.backends.torch_backend import TorchBackend

        for h in hf:
            if h == "prompt-lookup":
                systems.append(System("hf-prompt-lookup", hf={"prompt_lookup": 10}))
            elif h == "assisted":
                assistant = TorchBackend.load(drafts[0], threads=ns.draft_threads).model
                systems.append(System(f"hf-assisted[{drafts[0]}]", hf={"assistant": assistant}))
    return systems


def cmd_bench(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    from specsplit.backends.load import load_backend
    from specsplit.faces.api import SpeculativeDecoder
    from specsplit.faces.prompts import load_humaneval, load_spec_bench

    if ns.suite == "spec-bench":
        cats = ns.categories.split(",") if ns.categories else None
        prompts = load_spec_bench(ns.questions, cats, ns.limit)
    else:
        prompts = load_humaneval(ns.limit)
    target = load_backend(ns.target_backend, ns.target, threads=ns.target_threads, n_ctx=8192)
    systems = build_systems(ns, target)
    encoder = SpeculativeDecoder(target, None, warm_up=False)
    for s in systems:  # warm-up: untimed
        if s.engine is not None:
            s.engine.warm_up(encoder.encode_prompt(prompts[0].text)[:64])
        run_one(s, target, encoder.encode_prompt("Say hi."), 8)
    records: list[dict] = []
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(prompts) * ns.repeats * len(systems), unit="run")
    for rep in range(ns.repeats):
        for i, p in enumerate(prompts):
            ids = encoder.encode_prompt(p.text)
            order = systems[(i + rep) % len(systems) :] + systems[: (i + rep) % len(systems)]
            results = {}
            for s in order:
                results[s.name] = run_one(s, target, ids, ns.max_new_tokens)
                bar.update(1)
            base = results["target"]["token_ids"]
            equal = {s: r["token_ids"] == base for s, r in results.items()}
            records.append(
                {
                    "id": p.id,
                    "category": p.category,
                    "repeat": rep,
                    "prompt_tokens": len(ids),
                    "results": results,
                    "greedy_equal": equal,
                }
            )
            main = systems[1].name
            sp = _median(
                [
                    r["results"][main]["tokens_per_s"] / r["results"]["target"]["tokens_per_s"]
                    for r in records
                ]
            )
            bar.set_postfix_str(f"median speedup {main}: {sp:.2f}x")
    bar.close()
    summary = summarise(records, [s.name for s in systems], "target")
    doc = {
        "schema": "specsplit.bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {k: v for k, v in vars(ns).items() if k != "func"},
        "target_backend": target.name,
        "systems": [s.name for s in systems],
        "summary": summary,
        "prompts": records,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    for name, r in summary["overall"].items():
        sp = r["median_speedup"]
        print(
            f"{name:40s} {r['median_tokens_per_s']:7.2f} tok/s  speedup {sp:5.2f}x  "
            f"acceptance {r['median_acceptance_rate'] or 0:.2f}  tau {r['median_mean_accepted_length'] or 0:.2f}  "
            f"greedy-equal {r['greedy_equal_to_target']}"
        )
    print(f"wrote {out / 'results.json'}")
    return 0
