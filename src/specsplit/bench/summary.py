"""Summaries of `specsplit bench` runs: medians and spreads, pooled acceptance, speedups
from the same prompt and repeat, and the physical limit of each speculative system
(docs/bench_results.md defines every key)."""

from __future__ import annotations

import numpy as np


def spread(xs: list[float | None]) -> dict | None:
    """Median and quartiles of the values present."""
    v = [float(x) for x in xs if x is not None]
    if not v:
        return None
    p25, p50, p75 = np.percentile(v, [25, 50, 75])
    return {"median": float(p50), "p25": float(p25), "p75": float(p75)}


def _sum(rows: list[dict], key: str) -> float:
    return float(sum(r.get(key) or 0 for r in rows))


def _pooled_positions(rows: list[dict]) -> list[float] | None:
    prop: list[int] = []
    acc: list[int] = []
    for r in rows:
        for i, (p, a) in enumerate(zip(r.get("pos_proposed") or [], r.get("pos_accepted") or [])):
            if i == len(prop):
                prop.append(0)
                acc.append(0)
            prop[i] += p
            acc[i] += a
    return [a / p if p else 0.0 for a, p in zip(acc, prop)] or None


def summarise_system(records: list[dict], system: str, baseline: str) -> dict:
    """One system over the given prompt records."""
    pairs = [
        (r["results"][system], r["results"][baseline])
        for r in records
        if system in r["results"] and baseline in r["results"]
    ]
    rows = [s for s, _ in pairs]
    proposed, new = _sum(rows, "proposed"), _sum(rows, "new_tokens")
    passes = _sum(rows, "target_passes")
    total = _sum(rows, "total_s")
    split = {k: _sum(rows, f"{k}_s") for k in ("draft", "network", "verify", "queue")}
    eq = [r["greedy_equal"].get(system) for r in records if system in r["results"]]
    return {
        "prompts": len(rows),
        "tokens_per_s": spread([s["tokens_per_s"] for s in rows]),
        "decode_tokens_per_s": spread([s["decode_tokens_per_s"] for s in rows]),
        "time_to_first_token_s": spread([s["time_to_first_token_s"] for s in rows]),
        "ms_per_token": spread(
            [1000 * s["total_s"] / s["new_tokens"] for s in rows if s["new_tokens"]]
        ),
        "speedup": spread(
            [s["tokens_per_s"] / b["tokens_per_s"] for s, b in pairs if b["tokens_per_s"] > 0]
        ),
        "decode_speedup": spread(
            [
                s["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                for s, b in pairs
                if b["decode_tokens_per_s"] > 0
            ]
        ),
        "acceptance_rate": _sum(rows, "accepted") / proposed if proposed else None,
        "mean_accepted_length": new / passes if passes else None,
        "target_passes_per_token": passes / new if passes and new else None,
        "per_position_acceptance": _pooled_positions(rows),
        "time_split": (
            {**{k: v / total for k, v in split.items()}, "other": 1 - sum(split.values()) / total}
            if total > 0 and any(split.values())
            else None
        ),
        "bytes_per_token": (spread([s.get("bytes_per_token") for s in rows]) or {}).get("median"),
        "greedy_equal": (
            None
            if any(e is None for e in eq)
            else {
                "equal": sum(bool(e) for e in eq),
                "of": len(eq),
                "near_tie": sum(
                    bool(r.get("divergence", {}).get(system, {}).get("near_tie")) for r in records
                ),
            }
        ),
    }


def summarise(records: list[dict], systems: list[str], baseline: str) -> dict:
    """Every system, overall and per category."""
    cats = sorted({r["category"] for r in records})
    return {
        "overall": {s: summarise_system(records, s, baseline) for s in systems},
        "per_category": {
            c: {
                s: summarise_system([r for r in records if r["category"] == c], s, baseline)
                for s in systems
            }
            for c in cats
        },
    }


def _availability(rows: list[dict], n: int) -> np.ndarray:
    """[n] P(the drafter delivers an i-th token | the policy asked for >= i), i = 1..n, pooled
    over rounds: 1 for a draft model, below 1 where an n-gram table finds no (or a short)
    match. Positions never asked for, and runs recorded without ``draft_asked``, count 1."""
    asked = np.zeros(n)  # [n] rounds that asked for position i
    got = np.zeros(n)  # [n] rounds whose draft reached position i
    for r in rows:
        ks, want = r.get("draft_lengths") or [], r.get("draft_asked") or []
        if len(ks) != len(want):
            continue
        for k, a in zip(ks, want):
            asked[: min(a, n)] += 1
            got[: min(k, a, n)] += 1
    return np.where(asked > 0, got / np.maximum(asked, 1), 1.0)


def _decode_rate(rows: list[dict], start: str) -> float | None:
    """Pooled tokens/s after the first token (``start``: the seconds to leave out)."""
    n = sum(max(0, r["new_tokens"] - 1) for r in rows)
    t = sum(r["total_s"] - (r.get(start) or 0.0) for r in rows)
    return n / t if n and t > 0 else None


def _rounds(row: dict) -> int:
    """A run's verification rounds: its target passes but the prompt's prefill, whose pass
    gave the first token (its time is the prefill's, not verify_s)."""
    return max(0, (row.get("target_passes") or 0) - 1)


def pass_cost_fit(records: list[dict], systems: list[str]) -> tuple[float, float] | None:
    """Seconds per target pass as a + b * (tokens in the pass), fitted by least squares over
    every prompt of the given (local) systems: verify_s = a * passes + b * (passes +
    proposed). On a CPU a pass's cost grows with its tokens (compute-bound), so a fixed K's
    pass is priced at its own size, not at the mean size of the passes the policy chose.
    None when the rows do not pin both (one pass size only)."""
    rows = [
        r["results"][s] for r in records for s in systems if s in r["results"]
    ]  # (each prompt's run of each system)
    x = np.array(
        [[_rounds(r), _rounds(r) + r["proposed"]] for r in rows if r.get("target_passes")],
        dtype=float,
    )  # [rows, 2] passes, tokens verified
    y = np.array([r["verify_s"] for r in rows if r.get("target_passes")], dtype=float)  # [rows]
    if len(x) < 2 or np.linalg.matrix_rank(x) < 2:
        return None
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    return (float(a), float(b)) if a > 0 and b >= 0 else None


def physical_limit(
    records: list[dict],
    system: str,
    baseline: str,
    pass_cost: tuple[float, float] | None = None,
) -> dict | None:
    """The speedup ideal speculation would give for this system's measured acceptance and
    costs: expected tokens per round over the round's cost, against the baseline's
    measured time per decoded token. Pooled over every run; None without draft tokens.

    - at the K it chose: the rounds it ran, with nothing but drafting and verifying;
    - at the best fixed K: max over K of E(K) / (D(K) * draft s/token + pass(K)), E(K) = 1 +
      sum_{i<=K} v_i prod_{j<=i} a_j, D(K) = sum_{i<=K} v_i the draft tokens a round gets
      (v_i: the share of rounds asking for an i-th token that got one, 1 for a draft model,
      less for an n-gram table that finds no match); pass(K) = a + b * (D(K) + 1) from
      ``pass_cost`` (the run's fit, see ``pass_cost_fit``) plus this system's network and
      queue seconds per pass, or without a fit the pass cost as measured for any K (an upper
      bound where passes are compute-bound);
    - with free drafting: draft cost 0, the longest K measured.
    K = 0 (the target alone, 1.0x) is always a choice of the last two.
    For a tree system (tree[...]) K is the tree's depth and a_j the acceptance at depth j of
    the trees it drafted, so "best fixed K" is the best fixed depth at the widths it chose
    (draft seconds per level and tree tokens per level as measured), not a search over
    widths.
    The measured figure beside them is the pooled tokens/s after the prompt's prefill."""
    rows = [r["results"][system] for r in records if system in r["results"]]
    base = [r["results"][baseline] for r in records if baseline in r["results"]]
    passes, proposed = sum(_rounds(r) for r in rows), _sum(rows, "proposed")
    alpha = _pooled_positions(rows)
    # each round's K, the prefill's first token (the first entry) left out
    lengths = [k for r in rows for k in (r.get("draft_lengths") or [])[1:]]
    base_rate = _decode_rate(base, "time_to_first_token_s")
    if not passes or not proposed or not alpha or not lengths or not base_rate:
        return None
    reach = np.cumprod(alpha)  # [K_max] P(the first i draft tokens all pass)
    chosen = float(np.mean([1 + reach[: min(k, len(alpha))].sum() for k in lengths]))
    avail = _availability(rows, len(alpha))  # [K_max]
    expected = 1 + np.concatenate([[0.0], np.cumsum(avail * reach)])  # [K_max + 1] E(K)
    drafted = np.concatenate([[0.0], np.cumsum(avail)])  # [K_max + 1] D(K)
    per_draft = _sum(rows, "draft_s") / proposed
    overhead = (_sum(rows, "network_s") + _sum(rows, "queue_s")) / passes
    per_pass = _sum(rows, "verify_s") / passes + overhead
    cost = _sum(rows, "draft_s") / passes + per_pass
    if per_pass <= 0:
        return None
    # tokens a pass verifies per level of draft (1 for a chain, the tree's width for a tree)
    per_level = max(1.0, proposed / max(1, sum(lengths)))
    if pass_cost is not None:
        a, b = pass_cost
        pass_k = a + b * (1 + drafted * per_level) + overhead  # [K_max + 1] s per pass at K
    else:
        pass_k = np.full(len(drafted), per_pass)
    rate = expected / (drafted * per_draft * per_level + pass_k)  # [K_max + 1] tokens/s at K
    best = int(np.argmax(rate[1:])) + 1
    measured = _decode_rate(rows, "prefill_s")
    return {
        "expected_tokens_per_round": chosen,
        "round_cost_s": cost,
        "baseline_s_per_token": 1 / base_rate,
        "limit_speedup": chosen / cost / base_rate,
        "best_k": best,
        "best_k_limit_speedup": max(1.0, float(rate[best]) / base_rate),
        "free_draft_limit_speedup": max(1.0, float(np.max(expected / pass_k)) / base_rate),
        "measured_speedup": measured / base_rate if measured else None,
        "pass_cost_fitted": pass_cost is not None,
    }


def refresh(doc: dict) -> dict:
    """Summary and physical limits (overall and per category) recomputed from a results
    document's per-prompt runs."""
    names = [s["name"] for s in doc["systems"]]
    base = doc["baseline"]
    doc["summary"] = summarise(doc["prompts"], names, base)
    # not for the edge: it drafts while a round is verified, on the server's CPU here, so its
    # draft and verify times overlap and add up to more than the wall time
    local = [s["name"] for s in doc["systems"] if s["kind"] in ("target", "specsplit-local")]
    fit = pass_cost_fit(doc["prompts"], local)
    limited = [s["name"] for s in doc["systems"] if s["kind"] != "edge-cloud"]

    def limits(records: list[dict]) -> dict:
        found = {n: physical_limit(records, n, base, fit) for n in limited}
        return {k: v for k, v in found.items() if v is not None}

    doc["physical_limit"] = limits(doc["prompts"])
    doc["physical_limit_by_category"] = {
        c: limits([r for r in doc["prompts"] if r["category"] == c])
        for c in sorted({r["category"] for r in doc["prompts"]})
    }
    doc["pass_cost_fit"] = None if fit is None else {"s_per_pass": fit[0], "s_per_token": fit[1]}
    return doc
