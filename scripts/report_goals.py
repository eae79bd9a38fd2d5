"""The figures issue 12's goals name, from a `specsplit bench` results.json: medians of
per-prompt ratios (DESIGN.md) of tokens/s against the target alone (all prompts, the
Spec-Bench categories alone, each category), the draft-model chain against HF assisted
generation, first-token ratios, and the policy's share of its physical limit by category.

    python scripts/report_goals.py benchmarks/report/results_torch.json
"""

from __future__ import annotations

import json
import statistics
import sys


def main() -> None:
    doc = json.loads(open(sys.argv[1]).read())
    prompts, base = doc["prompts"], doc["baseline"]
    names = [s["name"] for s in doc["systems"] if s["name"] != base]

    def ratios(name: str, keep=lambda r: True, key: str = "tokens_per_s") -> list[float]:  # noqa: ANN001
        return [
            r["results"][name][key] / r["results"][base][key]
            for r in prompts
            if name in r["results"] and keep(r)
        ]

    med = statistics.median
    cats = sorted({r["category"] for r in prompts})
    for n in names:
        per = " ".join(f"{c} {med(ratios(n, lambda r, c=c: r['category'] == c)):.2f}" for c in cats)
        spec_bench = ratios(n, lambda r: r["category"] != "humaneval")
        ttft = ratios(n, key="time_to_first_token_s")  # (a time: lower is better)
        print(
            f"{n}: all {med(ratios(n)):.2f}x, Spec-Bench {med(spec_bench):.2f}x; {per}; "
            f"first token / target's {med(ttft):.2f}"
        )
    chain = next((n for n in names if n.startswith("spec[") and "ngram" not in n), None)
    hf = next((n for n in names if n.startswith("hf")), None)
    if chain and hf:
        both = [r for r in prompts if chain in r["results"] and hf in r["results"]]
        vs = [r["results"][chain]["tokens_per_s"] / r["results"][hf]["tokens_per_s"] for r in both]
        print(f"{chain} against {hf}: {med(vs):.2f}x")
    limits = [
        *sorted(doc["physical_limit_by_category"].items()),
        ("overall", doc["physical_limit"]),
    ]
    print("measured after the prefill / limit at the best fixed K (share):")
    for c, by_system in limits:
        cells = [
            f"{n} {lim['measured_speedup']:.2f}/{lim['best_k_limit_speedup']:.2f} (K "
            f"{lim['best_k']}) = {lim['measured_speedup'] / lim['best_k_limit_speedup']:.2f}"
            for n, lim in by_system.items()
            if lim.get("measured_speedup")
        ]
        print(f"  {c}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
