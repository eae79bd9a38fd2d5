"""bench_report: CSV, plots, report and README block from a small synthetic results doc."""

from __future__ import annotations

import copy
import csv
import json

import pytest

from specsplit.bench import report as br

SPEC = "spec[d0,k=auto]"
EDGE0, EDGE20 = "edge[d0,rtt=0]", "edge[d0,rtt=20]"
CLOUD0, CLOUD20 = "cloud-only[rtt=0]", "cloud-only[rtt=20]"
TPS = {"target": 10.0, SPEC: 16.0, EDGE0: 14.0, EDGE20: 9.0, CLOUD0: 10.5, CLOUD20: 6.0}
PNG = b"\x89PNG\r\n\x1a\n"


def _q(m: float) -> dict:
    return {"median": m, "p25": 0.9 * m, "p75": 1.1 * m}


def _run(name: str, i: int) -> dict:
    tps = TPS[name] + i * (1 if name == "target" else 3)  # speedup differs per prompt
    run = {
        "token_ids": [1, 2, 3],
        "new_tokens": 3,
        "total_s": 3 / tps,
        "tokens_per_s": tps,
        "decode_tokens_per_s": tps * 1.1,
        "time_to_first_token_s": 0.05,
    }
    if name != "target":
        run |= {
            "target_passes": 2,
            "proposed": 4,
            "accepted": 2,
            "acceptance_rate": 0.5,
            "mean_accepted_length": 1.5,
            "draft_s": 0.01,
            "verify_s": 0.1,
        }
    if name != SPEC and name != "target":
        run["network_s"], run["bytes_per_token"] = 0.02, 40.0
    return run


def _summary(name: str) -> dict:
    s = {
        "prompts": 4,
        "tokens_per_s": _q(TPS[name]),
        "decode_tokens_per_s": _q(TPS[name]),
        "time_to_first_token_s": _q(0.05),
        "ms_per_token": _q(1000 / TPS[name]),
        "speedup": _q(TPS[name] / 10),
        "decode_speedup": _q(TPS[name] / 10),
        "acceptance_rate": None,
        "mean_accepted_length": None,
        "target_passes_per_token": None,
        "per_position_acceptance": None,
        "bytes_per_token": None,
        "time_split": {"draft": 0.1, "network": 0.0, "verify": 0.8, "queue": 0.0, "other": 0.1},
        "greedy_equal": {"equal": 4, "of": 4},
    }
    if name == SPEC:
        s |= {
            "acceptance_rate": 0.62,
            "mean_accepted_length": 2.4,
            "target_passes_per_token": 0.42,
            "per_position_acceptance": [0.8, 0.6, 0.4],
        }
    return s


def make_doc(backend: str = "torch") -> dict:
    systems = [
        {"name": "target", "kind": "target", "drafter": None, "rtt_ms": None},
        {"name": SPEC, "kind": "specsplit-local", "drafter": "d0", "rtt_ms": None},
        {"name": EDGE0, "kind": "edge-cloud", "drafter": "d0", "rtt_ms": 0},
        {"name": EDGE20, "kind": "edge-cloud", "drafter": "d0", "rtt_ms": 20},
        {"name": CLOUD0, "kind": "cloud-only", "drafter": None, "rtt_ms": 0},
        {"name": CLOUD20, "kind": "cloud-only", "drafter": None, "rtt_ms": 20},
    ]
    names = [s["name"] for s in systems]
    prompts = [
        {
            "id": f"{cat}/{i}",
            "category": cat,
            "repeat": 0,
            "prompt_tokens": 20 + i,
            "order": names[i % 3 :] + names[: i % 3],
            "results": {n: _run(n, i) for n in names},
            "greedy_equal": {n: n != CLOUD20 for n in names},
        }
        for i, cat in enumerate(["coding", "coding", "math", "math"])
    ]
    overall = {n: _summary(n) for n in names}
    return {
        "schema": br.SCHEMA,
        "created": "2026-11-23T10:00:00",
        "command": f"specsplit bench --suite spec-bench --target-backend {backend} --out x",
        "machine": {"cpus": 2, "platform": "linux", "python": "3.11.7"},
        "config": {
            "suite": "spec-bench",
            "limit": 2,
            "max_new_tokens": 64,
            "repeats": 1,
            "k": "auto",
        },
        "target": {"name": "tiny-target", "backend": backend},
        "baseline": "target",
        "systems": systems,
        "skipped": [{"name": "llama-speculative", "reason": "no binary given"}],
        "prompts": prompts,
        "summary": {"overall": overall, "per_category": {"coding": overall, "math": overall}},
        "physical_limit": {
            SPEC: {
                "expected_tokens_per_round": 3.1,
                "round_cost_s": 0.2,
                "baseline_s_per_token": 0.1,
                "limit_speedup": 2.1,
                "best_k": 6,
                "best_k_limit_speedup": 2.3,
                "free_draft_limit_speedup": 2.6,
                "measured_speedup": 1.6,
            }
        },
        "memory": {
            "bench_process_peak_bytes": 3_000_000_000,
            "server_process_peak_bytes": None,
            "model_rss_bytes": {"tiny-target": 1_500_000_000},
        },
        "throughput": {
            "max_batch": 8,
            "k": 16,
            "rows": [
                {
                    "clients": c,
                    "server_tokens_per_s": 10.0 * c,
                    "decode_phase_tokens_per_s": 12.0 * c,
                    "mean_batch_size": c,
                    "target_passes_per_token": 0.4,
                    "median_ttft_s": 0.1,
                    "p50_tbt_s": 0.05,
                    "p99_tbt_s": 0.2,
                    "greedy_equal": True,
                }
                for c in (1, 2, 4)
            ],
        },
    }


def test_csv_rows_columns_and_speedup(tmp_path):
    doc = make_doc()
    br.write_csv(doc, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == br.CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(doc["prompts"]) * len(doc["systems"])
    for row in rows:
        rec = next(r for r in doc["prompts"] if r["id"] == row["id"])
        want = (
            rec["results"][row["system"]]["tokens_per_s"] / rec["results"]["target"]["tokens_per_s"]
        )
        assert float(row["speedup"]) == pytest.approx(want)
        assert row["greedy_equal"] == str(rec["greedy_equal"][row["system"]]).lower()
        assert row["kind"]
    target_row = next(r for r in rows if r["system"] == "target")
    assert target_row["acceptance_rate"] == "" and target_row["bytes_per_token"] == ""
    assert {r["system"] for r in rows if r["bytes_per_token"]} == {EDGE0, EDGE20, CLOUD0, CLOUD20}


def test_plots_written_as_png(tmp_path):
    docs = [make_doc("torch"), make_doc("llama.cpp")]
    paths = br.plot_all(docs, tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        [
            "speedup_by_category.png",
            "acceptance_by_position.png",
            "tokens_per_s_vs_rtt.png",
            "throughput_vs_clients.png",
        ]
    )
    for p in paths:
        assert p.read_bytes()[:8] == PNG


def test_plots_skip_what_is_missing(tmp_path):
    doc = make_doc()
    doc["systems"] = doc["systems"][:2]
    doc["throughput"] = None
    names = {p.name for p in br.plot_all([doc], tmp_path)}
    assert names == {"speedup_by_category.png", "acceptance_by_position.png"}


def test_report_mentions_systems_and_embeds_plots(tmp_path):
    docs = [make_doc("torch"), make_doc("llama.cpp")]
    path = br.write_report(docs, tmp_path, command="specsplit bench report a b --out r")
    text = path.read_text()
    for s in docs[0]["systems"]:
        assert s["name"] in text
    for png in tmp_path.glob("*.png"):
        assert f"]({png.name})" in text
    assert (tmp_path / "results_torch.csv").exists() and (
        tmp_path / "results_llama.cpp.csv"
    ).exists()
    assert "target: tiny-target (llama.cpp)" in text
    assert "1.60x (1.44–1.76x)" in text  # the spec system's speedup median (p25–p75)
    assert "100.0 ms/token" in text  # the baseline's time per token
    assert "no binary given" in text and "3.00 GB" in text
    assert br.physical_limit_lines(docs[0])[0] == (
        f"{SPEC}: measured 1.60x after the prefill; physical limit 2.10x at the K it chose "
        "(3.10 tokens per 0.20 s round), 2.30x at the best fixed K (6), 2.60x with free drafting"
    )
    assert "| 4 | 40.0 | 48.0 |" in text  # throughput row for 4 clients


def test_report_survives_sparse_doc(tmp_path):
    doc = make_doc()
    for key in ("config", "machine", "memory", "throughput", "physical_limit", "skipped"):
        doc.pop(key)
    doc["summary"]["overall"][SPEC]["speedup"] = None
    text = br.write_report([doc], tmp_path).read_text()
    assert (tmp_path / "results.csv").exists()
    assert "K –" in text and br.DASH in text


def test_readme_section_and_update(tmp_path):
    section = br.readme_section([make_doc()], "bench_runs/r/report.md")
    assert "[bench_runs/r/report.md](bench_runs/r/report.md)" in section
    assert "specsplit bench --suite spec-bench" in section
    assert f"Speedup of `{SPEC}` by category: coding 1.60x, math 1.60x." in section
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n\n{br.README_START}\nold stuff\n{br.README_END}\n\n## tail\n")
    assert br.update_readme(readme, section) is True
    text = readme.read_text()
    assert text.startswith(f"# top\n\n{br.README_START}\n") and text.endswith(
        f"{br.README_END}\n\n## tail\n"
    )
    assert "old stuff" not in text and section.strip() in text
    assert br.update_readme(readme, section) is False
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        br.update_readme(readme, section)


def test_load_docs(tmp_path):
    doc = make_doc()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(doc))
    bad = copy.deepcopy(doc) | {"schema": "specsplit.bench/1"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert br.load_docs([tmp_path / "run", tmp_path / "run" / "results.json"]) == [doc, doc]
    with pytest.raises(ValueError, match="specsplit.bench/1"):
        br.load_docs([tmp_path / "bad.json"])


def test_added_systems_notes_and_llama_bench_in_report_and_readme(tmp_path):
    doc = make_doc("llama.cpp")
    doc["systems"].append(
        {"name": "llama-speculative", "kind": "llama-speculative", "note": "ids re-tokenized"}
    )
    doc["summary"]["overall"]["llama-speculative"] = _summary("target")
    doc["added"] = [
        {
            "systems": ["llama-speculative"],
            "prompts": {"llama-speculative": 4},
            "created": "2026-12-02T07:00:00",
            "command": "specsplit bench --llama-speculative x --resume --out y",
            "load_avg": {"start": [0.42, 1.0, 1.2], "end": [2.1, 2.0, 1.5]},
        }
    ]
    doc["llama_bench"] = {
        "command": "llama-bench -m t.gguf -p 512 -n 128 -t 2 -r 5 -o json",
        "threads": 2,
        "repetitions": 5,
        "build": {"build_commit": "abc"},
        "rows": [
            {"model": "t", "test": "pp512", "tokens_per_s": 60.0, "stddev_tokens_per_s": 1.0},
            {"model": "t", "test": "tg128", "tokens_per_s": 20.0, "stddev_tokens_per_s": 0.1},
        ],
    }
    added = (
        "`llama-speculative` added on 2026-12-02T07:00:00 by a later run with `--resume`, "
        "1-minute load 0.42 at its start: its speedup divides by `target` (the target alone) "
        "as measured in the original run (2026-11-23T10:00:00) on the same machine, not "
        "interleaved with it in the same minute."
    )
    bench = (
        "llama.cpp's own `llama-bench` (2 threads, 5 repetitions, build abc): "
        "t pp512 60.0 ± 1.0, tg128 20.0 ± 0.1 tok/s."
    )
    text = br.write_report([doc], tmp_path).read_text()
    assert added in text and bench in text and "llama-speculative: ids re-tokenized." in text
    assert "`llama-bench -m t.gguf -p 512 -n 128 -t 2 -r 5 -o json`" in text
    section = br.readme_section([doc], "r.md")
    assert f"- {added}" in section and f"- {bench}" in section
    assert "| llama-speculative |" in section
    cmds = section.split("```")[1].strip().splitlines()
    assert cmds == [doc["command"], doc["added"][0]["command"]]
    doc["added"][0]["machine"] = {**doc["machine"], "platform": "linux-2"}
    assert (
        "on a machine described otherwise (platform linux then, linux-2 now)"
        in (br.added_lines(doc)[0])
    )
