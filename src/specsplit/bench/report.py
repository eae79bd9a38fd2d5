"""Turn `specsplit.bench/2` results (docs/bench_results.md) into CSV, PNG plots and Markdown."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np

from specsplit.bench.llama_bench import reference_line

SCHEMA = "specsplit.bench/2"
DPI = 110
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
CSV_COLUMNS = [
    "id", "category", "repeat", "system", "kind", "prompt_tokens", "new_tokens", "total_s",
    "tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s", "speedup", "acceptance_rate",
    "mean_accepted_length", "target_passes", "draft_s", "network_s", "verify_s", "queue_s",
    "bytes_per_token", "greedy_equal",
]  # fmt: skip
DASH = "–"


# ---- reading ----


def load_docs(paths: list[Path]) -> list[dict]:
    """Load results.json files (or run folders holding one), checking the schema."""
    docs = []
    for p in map(Path, paths):
        f = p / "results.json" if p.is_dir() else p
        doc = json.loads(f.read_text())
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"{f}: schema {doc.get('schema')!r}, expected {SCHEMA!r}")
        docs.append(doc)
    return docs


def _baseline(doc: dict) -> str:
    return doc.get("baseline") or "target"


def _systems(doc: dict) -> list[dict]:
    """Every system of the doc in build order; the baseline first if it is not listed."""
    systems = list(doc.get("systems") or [])
    names = {s["name"] for s in systems}
    if _baseline(doc) not in names:
        systems.insert(0, {"name": _baseline(doc), "kind": "target"})
    for name in doc.get("summary", {}).get("overall", {}):
        if name not in names and name != _baseline(doc):
            systems.append({"name": name, "kind": None})
    return systems


def _overall(doc: dict) -> dict[str, dict]:
    return doc.get("summary", {}).get("overall", {})


def _per_category(doc: dict) -> dict[str, dict]:
    return doc.get("summary", {}).get("per_category", {})


def _med(summary: dict | None, key: str) -> float | None:
    q = (summary or {}).get(key)
    return q.get("median") if isinstance(q, dict) else q


def _tps(doc: dict, name: str) -> float | None:
    return _med(_overall(doc).get(name), "tokens_per_s")


def _title(doc: dict) -> str:
    t = doc.get("target", {})
    kind = ", ".join(x for x in (t.get("backend", "?"), t.get("dtype")) if x)
    return f"target: {t.get('name', '?')} ({kind})"


# ---- formatting ----


def _num(x: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return DASH if x is None else f"{x:{fmt}}{suffix}"


def _quart(q: dict | None, fmt: str, suffix: str = "") -> str:
    """`median (p25–p75)`, e.g. `1.62x (1.40–1.85x)`."""
    if not q or q.get("median") is None:
        return DASH
    s = _num(q["median"], fmt, suffix)
    if q.get("p25") is not None and q.get("p75") is not None:
        s += f" ({q['p25']:{fmt}}–{q['p75']:{fmt}}{suffix})"
    return s


def _equal(g: dict | bool | None) -> str:
    if isinstance(g, dict):
        ties = f" ({g['near_tie']} near ties)" if g.get("near_tie") else ""
        return f"{g.get('equal')}/{g.get('of')}{ties}"
    return DASH if g is None else ("yes" if g else "no")


def _split(ts: dict | None) -> str:
    if not ts:
        return DASH
    return "/".join(
        _num(ts.get(k) and 100 * ts[k], ".0f") for k in ("draft", "network", "verify", "queue")
    )


def _gb(b: float | None) -> str:
    return _num(b and b / 1e9, ".2f", " GB")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


# ---- CSV ----


def write_csv(doc: dict, path: Path) -> None:
    """results.csv: one row per prompt, repeat and system (columns per docs/bench_results.md)."""
    kinds = {s["name"]: s.get("kind") for s in _systems(doc)}
    base = _baseline(doc)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for rec in doc.get("prompts", []):
            base_tps = rec["results"].get(base, {}).get("tokens_per_s")
            names = [n for n in kinds if n in rec["results"]]  # build order, then any extra
            for name in names + [n for n in rec["results"] if n not in kinds]:
                run = rec["results"][name]
                tps = run.get("tokens_per_s")
                eq = (rec.get("greedy_equal") or {}).get(name)
                row = {k: run.get(k) for k in CSV_COLUMNS}
                row |= {
                    "id": rec.get("id"),
                    "category": rec.get("category"),
                    "repeat": rec.get("repeat"),
                    "prompt_tokens": rec.get("prompt_tokens"),
                    "system": name,
                    "kind": kinds.get(name),
                    "speedup": tps / base_tps if tps is not None and base_tps else None,
                    "greedy_equal": None if eq is None else str(bool(eq)).lower(),
                }
                w.writerow({k: "" if v is None else v for k, v in row.items()})


# ---- plots ----


def _figure(nrows: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, 1, squeeze=False)[:, 0]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _plot_speedup(docs: list[dict], path: Path) -> Path:
    fig, axes = _figure(len(docs), 10, 4.5)
    for ax, doc in zip(axes, docs):
        cats = [*sorted(_per_category(doc)), "overall"]
        summaries = {**_per_category(doc), "overall": _overall(doc)}
        names = [
            s["name"]
            for s in _systems(doc)
            if s["name"] != _baseline(doc) and s["name"] in _overall(doc)
        ]
        x = np.arange(len(cats))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            qs = [(summaries[c].get(name) or {}).get("speedup") or {} for c in cats]
            med = np.array([q.get("median", np.nan) for q in qs], dtype=float)
            lo = np.array([q.get("p25", np.nan) for q in qs], dtype=float)
            hi = np.array([q.get("p75", np.nan) for q in qs], dtype=float)
            err = np.nan_to_num(np.clip([med - lo, hi - med], 0, None))
            ax.bar(
                x + (i - (len(names) - 1) / 2) * width, med, width, yerr=err, capsize=3, label=name
            )
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="target alone (1.0x)")
        ax.set_xticks(x, cats, rotation=20, ha="right")
        ax.set_ylabel("speedup (median, p25–p75)")
        ax.set_title(_title(doc))
        ax.legend(fontsize="small")
    fig.suptitle("Speedup over the target alone, by category")
    return _save(fig, path)


def _plot_acceptance(docs: list[dict], path: Path) -> Path | None:
    has = [
        {
            n: s["per_position_acceptance"]
            for n, s in _overall(d).items()
            if s.get("per_position_acceptance")
        }
        for d in docs
    ]
    if not any(has):
        return None
    fig, axes = _figure(len(docs), 8, 4)
    for ax, doc, curves in zip(axes, docs, has):
        for name, acc in curves.items():
            pos = np.arange(1, len(acc) + 1)
            ax.plot(pos, np.array(acc, dtype=float), marker="o", label=name)
        ax.set_ylim(0, 1)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate")
        ax.set_title(_title(doc))
        if curves:
            ax.legend(fontsize="small")
    fig.suptitle("Acceptance by draft position (pooled over all prompts)")
    return _save(fig, path)


def _plot_rtt(docs: list[dict], path: Path) -> Path | None:
    split_kinds = ("edge-cloud", "cloud-only")
    docs = [d for d in docs if any(s.get("kind") in split_kinds for s in _systems(d))]
    if not docs:
        return None
    fig, axes = _figure(len(docs), 8, 4.5)
    for ax, doc in zip(axes, docs):
        lines: dict[str, list[tuple[float, float]]] = {}
        for s in _systems(doc):
            tps = _tps(doc, s["name"])
            if s.get("kind") in split_kinds and s.get("rtt_ms") is not None and tps is not None:
                label = (
                    "cloud-only"
                    if s["kind"] == "cloud-only"
                    else f"edge-cloud [{s.get('drafter')}]"
                )
                lines.setdefault(label, []).append((s["rtt_ms"], tps))
        for color, (label, pts) in enumerate(lines.items()):
            ax.plot(*zip(*sorted(pts)), marker="o", color=f"C{color}", label=label)
        refs = [s["name"] for s in _systems(doc) if s.get("kind") == "specsplit-local"]
        for color, name in enumerate([_baseline(doc), *refs], start=len(lines)):
            if (tps := _tps(doc, name)) is not None:
                label = "target alone" if name == _baseline(doc) else f"{name} (local)"
                ax.axhline(tps, linestyle="--", color=f"C{color}", label=label)
        ax.set_xlabel("round-trip time (ms)")
        ax.set_ylabel("tokens/s (median)")
        ax.set_ylim(bottom=0)
        ax.set_title(_title(doc))
        ax.legend(fontsize="small")
    fig.suptitle("Tokens/s against network round-trip time")
    return _save(fig, path)


def _plot_throughput(docs: list[dict], path: Path) -> Path | None:
    docs = [d for d in docs if (d.get("throughput") or {}).get("rows")]
    if not docs:
        return None
    fig, (ax,) = _figure(1, 8, 4.5)
    for i, doc in enumerate(docs):
        rows = sorted(doc["throughput"]["rows"], key=lambda r: r["clients"])
        xs = [r["clients"] for r in rows]
        name = _title(doc).removeprefix("target: ")
        for key, style, what in (
            ("server_tokens_per_s", "-", "server"),
            ("decode_phase_tokens_per_s", "--", "decode-phase"),
        ):
            ys = [r.get(key) for r in rows]
            ax.plot(
                xs, ys, marker="o", linestyle=style, color=f"C{i}", label=f"{name}: {what} tok/s"
            )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("tokens/s (all clients)")
    ax.set_ylim(bottom=0)
    ax.set_title("Server throughput against concurrent clients")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_all(docs: list[dict], out: Path) -> list[Path]:
    """Write the PNG plots into `out`; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _plot_speedup(docs, out / "speedup_by_category.png"),
        _plot_acceptance(docs, out / "acceptance_by_position.png"),
        _plot_rtt(docs, out / "tokens_per_s_vs_rtt.png"),
        _plot_throughput(docs, out / "throughput_vs_clients.png"),
    ]
    return [p for p in paths if p is not None]


# ---- Markdown ----


def physical_limit_lines(doc: dict) -> list[str]:
    """One line per speculative system: measured decode speedup against its physical limit."""
    limits = doc.get("physical_limit") or {}
    order = [s["name"] for s in _systems(doc) if s["name"] in limits]
    order += [n for n in limits if n not in order]
    lines = []
    for name in order:
        lim = limits[name]
        lines.append(
            f"{name}: measured {_num(lim.get('measured_speedup'), '.2f', 'x')} after the "
            f"prefill; physical limit {_num(lim.get('limit_speedup'), '.2f', 'x')} at the K it "
            f"chose ({_num(lim.get('expected_tokens_per_round'), '.2f')} tokens per "
            f"{_num(lim.get('round_cost_s'), '.2f')} s round), "
            f"{_num(lim.get('best_k_limit_speedup'), '.2f', 'x')} at the best fixed K "
            f"({lim.get('best_k', DASH)}), "
            f"{_num(lim.get('free_draft_limit_speedup'), '.2f', 'x')} with free drafting"
        )
    return lines


def _limits_line(doc: dict) -> str:
    cfg = doc.get("config") or {}
    suite = cfg.get("suites") or cfg.get("suite")
    suite = ", ".join(suite) if isinstance(suite, list) else suite
    first = [r for r in doc.get("prompts", []) if r.get("repeat", 0) == 0]
    per_cat = Counter(r.get("category") for r in first)
    cats = ", ".join(f"{c} {n}" for c, n in sorted(per_cat.items(), key=lambda kv: str(kv[0])))
    return (
        f"Limits: suite {suite or DASH}; prompts per category: {cats or DASH}; "
        f"max_new_tokens {cfg.get('max_new_tokens', DASH)}; repeats {cfg.get('repeats', DASH)}; "
        f"K {cfg.get('k', DASH)}."
    )


def _overall_table(doc: dict) -> list[str]:
    header = [
        "system", "kind", "tok/s median (p25–p75)", "decode tok/s", "TTFT s",
        "speedup median (p25–p75)", "acceptance", "tau", "passes/token",
        "time split (draft/net/verify/queue %)", "bytes/token", "greedy equal (n/m)",
    ]  # fmt: skip
    rows = []
    for s in _systems(doc):
        r = _overall(doc).get(s["name"])
        if r is None:
            continue
        rows.append(
            [
                s["name"],
                s.get("kind") or DASH,
                _quart(r.get("tokens_per_s"), ".1f"),
                _num(_med(r, "decode_tokens_per_s"), ".1f"),
                _num(_med(r, "time_to_first_token_s"), ".2f"),
                _quart(r.get("speedup"), ".2f", "x"),
                _num(r.get("acceptance_rate")),
                _num(r.get("mean_accepted_length")),
                _num(r.get("target_passes_per_token")),
                _split(r.get("time_split")),
                _num(r.get("bytes_per_token"), ".0f"),
                _equal(r.get("greedy_equal")),
            ]
        )
    return _table(header, rows)


def limit_by_category_table(doc: dict) -> list[str]:
    """Per category and system: the measured speedup after the prefill, the physical limit
    at the best fixed K (or tree depth), and their ratio (the policy's share of the limit)."""
    by_cat = doc.get("physical_limit_by_category") or {}
    cats = {**dict(sorted(by_cat.items())), "overall": doc.get("physical_limit") or {}}
    names = [s["name"] for s in _systems(doc) if any(s["name"] in v for v in cats.values())]
    if not names:
        return []

    def cell(lim: dict | None) -> str:
        if not lim or lim.get("measured_speedup") is None:
            return DASH
        m, best = lim["measured_speedup"], lim["best_k_limit_speedup"]
        return f"{m:.2f}x / {best:.2f}x (K {lim['best_k']}) = {m / best:.2f}"

    rows = [[c] + [cell(cats[c].get(n)) for n in names] for c in cats]
    return _table(["category", *names], rows)


def _category_table(doc: dict) -> list[str]:
    names = [s["name"] for s in _systems(doc) if s["name"] != _baseline(doc)]
    cats = {**dict(sorted(_per_category(doc).items())), "overall": _overall(doc)}
    rows = [
        [c] + [_num(_med((cats[c].get(n) or {}), "speedup"), ".2f", "x") for n in names]
        for c in cats
    ]
    return _table(["category", *names], rows)


def _throughput_table(tp: dict) -> list[str]:
    header = [
        "clients", "server tok/s", "decode-phase tok/s", "mean batch", "passes/token",
        "median TTFT s", "p50 TBT ms", "p99 TBT ms", "greedy equal",
    ]  # fmt: skip
    rows = [
        [
            str(r.get("clients")),
            _num(r.get("server_tokens_per_s"), ".1f"),
            _num(r.get("decode_phase_tokens_per_s"), ".1f"),
            _num(r.get("mean_batch_size")),
            _num(r.get("target_passes_per_token")),
            _num(r.get("median_ttft_s")),
            _num(r.get("p50_tbt_s") and 1000 * r["p50_tbt_s"], ".1f"),
            _num(r.get("p99_tbt_s") and 1000 * r["p99_tbt_s"], ".1f"),
            _equal(r.get("greedy_equal")),
        ]
        for r in tp.get("rows", [])
    ]
    return [
        f"max_batch {tp.get('max_batch', DASH)}, K {tp.get('k', DASH)}.",
        "",
        *_table(header, rows),
    ]


def added_lines(doc: dict) -> list[str]:
    """One line per later run that added systems to finished prompts (``--resume``)."""
    base = _baseline(doc)
    then = doc.get("machine") or {}
    lines = []
    for a in doc.get("added") or []:
        names = ", ".join(f"`{n}`" for n in a.get("systems", []))
        load = (a.get("load_avg") or {}).get("start")
        at = f", 1-minute load {load[0]:.2f} at its start" if load else ""
        now = a.get("machine") or {}
        differ = [  # what both runs recorded of the machine, where it differs
            f"{k} {then[k]} then, {now[k]} now"
            for k in ("cpus", "cpu_model", "processor", "platform")
            if k in then and k in now and then[k] != now[k]
        ]
        where = (
            f"on a machine described otherwise ({'; '.join(differ)})"
            if differ
            else "on the same machine"
        )
        lines.append(
            f"{names} added on {a.get('created', DASH)} by a later run with `--resume`{at}: "
            f"its speedup divides by `{base}` (the target alone) as measured in the original "
            f"run ({doc.get('created', DASH)}) {where}, not interleaved with it in the same "
            "minute."
        )
    return lines


def _notes(doc: dict) -> list[str]:
    return [f"{s['name']}: {s['note']}." for s in _systems(doc) if s.get("note")]


def _doc_section(doc: dict) -> list[str]:
    machine = " · ".join(f"{k} {v}" for k, v in (doc.get("machine") or {}).items())
    base = _baseline(doc)
    ms = _med(_overall(doc).get(base), "ms_per_token")
    out = [
        f"## {_title(doc)}", "",
        f"Machine: {machine or DASH}. Created {doc.get('created', DASH)}.", "",
        _limits_line(doc), "",
        f"Command: `{doc.get('command') or DASH}`", "",
        "### Overall", "",
        f"Speedups divide by `{base}` (the target alone): {_num(ms, '.1f')} ms/token (median).", "",
        *_overall_table(doc), "",
        *[f"- {line}" for line in [*added_lines(doc), *_notes(doc)]],
        *([""] if added_lines(doc) or _notes(doc) else []),
        "### Speedup by category (median)", "",
        *_category_table(doc), "",
    ]  # fmt: skip
    if limits := physical_limit_lines(doc):
        out += ["### Physical limit", "", *[f"- {line}" for line in limits], ""]
    if table := limit_by_category_table(doc):
        fit = doc.get("pass_cost_fit")
        priced = (
            f"a pass priced at {1000 * fit['s_per_pass']:.0f} ms + "
            f"{1000 * fit['s_per_token']:.1f} ms per token it verifies (fitted over this run's "
            "local systems)"
            if fit
            else "a pass priced as measured"
        )
        out += [
            "### The policy against its limit, by category",
            "",
            "Measured speedup after the prefill / physical limit at the best fixed K (tree: "
            f"depth) = their ratio; {priced}. A fixed K counts the draft tokens the drafter "
            "delivered where asked (an n-gram table without a match delivers none).",
            "",
            *table,
            "",
        ]
    if ref := reference_line(doc.get("llama_bench")):
        out += ["### Reference: llama-bench", "", ref, "", f"`{doc['llama_bench']['command']}`", ""]
    if skipped := doc.get("skipped"):
        out += ["### Skipped systems", ""]
        out += [f"- {s.get('name')}: {s.get('reason', DASH)}" for s in skipped] + [""]
    if mem := doc.get("memory"):
        out += ["### Memory (peak RSS)", ""]
        out += [f"- bench process: {_gb(mem.get('bench_process_peak_bytes'))}"]
        out += [f"- server process: {_gb(mem.get('server_process_peak_bytes'))}"]
        loads = (mem.get("model_rss_bytes") or {}).items()
        out += [f"- RSS added by loading {k}: {_gb(v)}" for k, v in loads]
        out += ["", "(Weights are memory-mapped: their pages count as they are first read.)", ""]
    if tp := doc.get("throughput"):
        out += ["### Throughput (clients replaying drafts against one server)", ""]
        out += [f"Failed: {tp['error']}", ""] if "error" in tp else [*_throughput_table(tp), ""]
    return out


def _csv_names(docs: list[dict]) -> list[str]:
    if len(docs) == 1:
        return ["results.csv"]
    names: list[str] = []
    for d in docs:
        name = f"results_{d.get('target', {}).get('backend', 'unknown')}.csv"
        names.append(name if name not in names else name.replace(".csv", f"_{len(names)}.csv"))
    return names


def write_report(docs: list[dict], out: Path, command: str | None = None) -> Path:
    """Write out/report.md with the CSV file(s) and the plots it embeds; return its path."""
    out.mkdir(parents=True, exist_ok=True)
    csvs = _csv_names(docs)
    for doc, name in zip(docs, csvs):
        write_csv(doc, out / name)
    plots = plot_all(docs, out)
    lines = ["# specsplit bench report", ""]
    if command:
        lines += [f"Made with `{command}`.", ""]
    lines += ["Per-run rows: " + ", ".join(f"[{n}]({n})" for n in csvs) + ".", ""]
    for doc in docs:
        lines += _doc_section(doc)
    lines += ["## Figures", ""]
    lines += [f"![{p.stem.replace('_', ' ')}]({p.name})\n" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


# ---- README ----


def _main_system(doc: dict) -> str | None:
    """The first specsplit-local system with a summary (else the first non-baseline one)."""
    systems = [s for s in _systems(doc) if s["name"] in _overall(doc)]
    local = [s["name"] for s in systems if s.get("kind") == "specsplit-local"]
    rest = [s["name"] for s in systems if s["name"] != _baseline(doc)]
    return (local or rest or [None])[0]


def readme_section(docs: list[dict], report_rel: str) -> str:
    """The compact README block: headline table per doc, a link to the report and the commands."""
    lines: list[str] = []
    for doc in docs:
        rows = [
            [
                s["name"],
                _num(_med(r, "tokens_per_s"), ".1f"),
                _num(_med(r, "decode_tokens_per_s"), ".1f"),
                _num(_med(r, "time_to_first_token_s")),
                _num(_med(r, "speedup"), ".2f", "x"),
                _num(r.get("acceptance_rate")),
                _num(r.get("mean_accepted_length")),
                _equal(r.get("greedy_equal")),
            ]
            for s in _systems(doc)
            if (r := _overall(doc).get(s["name"])) is not None
        ]
        ms = _med(_overall(doc).get(_baseline(doc)), "ms_per_token")
        lines += [
            f"**{_title(doc)}**: {_limits_line(doc)} Target alone: {_num(ms, '.0f')} ms/token.",
            "",
        ]
        header = ["system", "tok/s", "decode tok/s", "TTFT s", "speedup", "acceptance", "tau"]
        lines += _table([*header, "greedy equal"], rows) + [""]
        extra = [*added_lines(doc), *_notes(doc)]
        if ref := reference_line(doc.get("llama_bench")):
            extra.append(ref)
        lines += [*[f"- {x}" for x in extra], ""] if extra else []
        if limits := physical_limit_lines(doc):
            lines += ["Physical limit:", "", *[f"- {line}" for line in limits], ""]
        if main := _main_system(doc):
            per = [
                f"{c} {_num(_med(s.get(main), 'speedup'), '.2f', 'x')}"
                for c, s in sorted(_per_category(doc).items())
            ]
            if per:
                lines += [f"Speedup of `{main}` by category: {', '.join(per)}.", ""]
    lines += [f"Full report: [{report_rel}]({report_rel}). Made with:", "", "```"]
    for doc in docs:
        lines.append(doc.get("command") or DASH)
        lines += [a.get("command") or DASH for a in doc.get("added") or []]
    lines.append("```")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, section: str) -> bool:
    """Replace the text between the bench marker lines of `readme`; return whether it changed."""
    text = readme.read_text()
    lines = text.splitlines(keepends=True)
    marks = [i for i, line in enumerate(lines) if line.strip() in (README_START, README_END)]
    kinds = [lines[i].strip() for i in marks]
    if kinds != [README_START, README_END]:
        raise ValueError(
            f"{readme}: needs one '{README_START}' line followed by one '{README_END}' line"
        )
    start, end = marks
    new = "".join(lines[: start + 1]) + "\n" + section.strip() + "\n\n" + "".join(lines[end:])
    if new == text:
        return False
    readme.write_text(new)
    return True
