"""The whole `specsplit bench` on tiny models: every system kind that runs without a GGUF,
the schema, the ratios recomputed from the per-prompt times it wrote, greedy equality."""

from __future__ import annotations

import argparse
import csv
import json
import statistics

import pytest

from conftest import perturbed, tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.torch_backend import TorchBackend
from specsplit.bench.harness import SCHEMA, Setup, add_bench_parser, run_bench, write_outputs
from specsplit.bench.prompts import Prompt
from specsplit.bench.summary import summarise
from specsplit.errors import ConfigError
from specsplit.proposers.ngram import NGramProposer
from specsplit.transport.server import ServerConfig, SpecsplitServer

PROMPTS = [
    Prompt("a/0", "alpha", "the cat sat on the mat and the cat sat"),
    Prompt("a/1", "alpha", "abcabcabcabc"),
    Prompt("b/0", "beta", "hello hello world"),
]


def _ns(out, *extra: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_bench_parser(ap.add_subparsers())
    ns = ap.parse_args(["bench", "--out", str(out), "--max-new-tokens", "20", *extra])
    ns.target, ns.func = "tiny", None
    return ns


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    tok = ByteTokenizer(300)
    target_model = tiny_llama(vocab=300, seed=0)
    draft_model = perturbed(target_model, 0.08, seed=1)
    target = TorchBackend(target_model, tok)
    srv = SpecsplitServer(
        TorchBackend(target_model, tok),
        "tiny",
        ServerConfig(port=0, http_port=0, rate=None, batch_window=0.01),
        make_proposers=lambda: [NGramProposer()],
    )
    srv.start()
    ns = _ns(
        out,
        *("--rtt", "0,10", "--cloud-rtt", "10", "--hf", "assisted,prompt-lookup", "--k", "3"),
        *("--llama-cpp-python", "plain,prompt-lookup", "--clients", "1,2", "--repeats", "2"),
    )
    setup = Setup(
        target,
        TorchBackend(draft_model, tok),
        "tinydraft",
        assistant=draft_model,
        server=("127.0.0.1", srv.port),
        server_http_port=srv.http.port,
    )
    try:
        doc = run_bench(ns, setup, PROMPTS)
    finally:
        for px in setup.proxies:
            px.stop()
        srv.stop(grace=0)
    write_outputs(doc, out)
    return doc, out


def test_every_system_ran_every_prompt_and_repeat(run):
    doc, _ = run
    names = [s["name"] for s in doc["systems"]]
    kinds = {s["kind"] for s in doc["systems"]}
    assert kinds == {"target", "specsplit-local", "edge-cloud", "cloud-only", "hf"}
    assert names[:4] == ["target", "spec[tinydraft]", "spec[ngram]", "spec[tinydraft+ngram]"]
    assert {"edge[tinydraft]@0ms", "edge[tinydraft]@10ms", "cloud-only@10ms"} <= set(names)
    assert {"hf-assisted[tinydraft]", "hf-prompt-lookup"} <= set(names)
    skipped = {s["name"] for s in doc["skipped"]}
    assert {"llama-cpp-python", "llama-cpp-python-prompt-lookup", "llama-speculative"} <= skipped
    assert len(doc["prompts"]) == len(PROMPTS) * 2
    orders = {tuple(r["order"]) for r in doc["prompts"]}
    assert len(orders) > 1  # interleaved: the order rotates
    for r in doc["prompts"]:
        assert set(r["results"]) == set(names)
        for res in r["results"].values():
            assert res["new_tokens"] == 20 and len(res["token_ids"]) == 20
            assert res["tokens_per_s"] == pytest.approx(res["new_tokens"] / res["total_s"])


def test_schema_and_outputs(run):
    doc, out = run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == SCHEMA == doc["schema"]
    for key in ("machine", "config", "target", "baseline", "systems", "skipped", "prompts"):
        assert key in on_disk
    for key in ("summary", "physical_limit", "memory", "throughput"):
        assert key in on_disk
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(doc["prompts"]) * len(doc["systems"])
    for name in ("speedup_by_category", "acceptance_by_position", "tokens_per_s_vs_rtt"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "throughput_vs_clients.png").exists()
    report = (out / "report.md").read_text()
    assert all(s["name"] in report for s in doc["systems"])
    assert "physical limit" in report.lower()


def test_speedups_are_ratios_of_the_times_it_wrote(run):
    doc, _ = run
    recs = doc["prompts"]
    for name, summ in doc["summary"]["overall"].items():
        ratios = [
            (r["results"][name]["new_tokens"] / r["results"][name]["total_s"])
            / (r["results"]["target"]["new_tokens"] / r["results"]["target"]["total_s"])
            for r in recs
        ]
        assert summ["speedup"]["median"] == pytest.approx(statistics.median(ratios))
    for cat, block in doc["summary"]["per_category"].items():
        rs = [r for r in recs if r["category"] == cat]
        ratios = [
            r["results"]["spec[ngram]"]["tokens_per_s"] / r["results"]["target"]["tokens_per_s"]
            for r in rs
        ]
        assert block["spec[ngram]"]["speedup"]["median"] == pytest.approx(statistics.median(ratios))
    assert doc["summary"]["overall"]["target"]["speedup"]["median"] == pytest.approx(1.0)


def test_specsplit_systems_equal_target_greedy_and_the_flag_says_so(run):
    doc, _ = run
    for r in doc["prompts"]:
        base = r["results"]["target"]["token_ids"]
        for name, res in r["results"].items():
            assert r["greedy_equal"][name] == (res["token_ids"] == base)
    kinds = {s["name"]: s["kind"] for s in doc["systems"]}
    for name, summ in doc["summary"]["overall"].items():
        if kinds[name] != "hf":
            assert summ["greedy_equal"] == {"equal": 6, "of": 6, "near_tie": 0}, name


def test_acceptance_counts_and_physical_limit(run):
    doc, _ = run
    spec = doc["summary"]["overall"]["spec[tinydraft]"]
    rows = [r["results"]["spec[tinydraft]"] for r in doc["prompts"]]
    acc = sum(x["accepted"] for x in rows) / sum(x["proposed"] for x in rows)
    assert spec["acceptance_rate"] == pytest.approx(acc)
    assert spec["mean_accepted_length"] >= 1
    # every pass emits its accepted tokens plus one: new = first token + accepted + passes
    for x in rows:
        assert x["new_tokens"] <= 1 + x["accepted"] + x["target_passes"]
    assert doc["summary"]["overall"]["target"]["acceptance_rate"] is None
    lim = doc["physical_limit"]["spec[tinydraft]"]
    assert 0 < lim["limit_speedup"] <= lim["free_draft_limit_speedup"]
    assert lim["best_k_limit_speedup"] <= lim["free_draft_limit_speedup"] + 1e-9
    assert 1 <= lim["best_k"] <= len(spec["per_position_acceptance"])
    assert (
        1
        <= lim["expected_tokens_per_round"]
        <= 1 + max(x for r in rows for x in r["draft_lengths"])
    )
    assert "edge[tinydraft]@10ms" not in doc["physical_limit"]  # its costs overlap
    edge = doc["summary"]["overall"]["edge[tinydraft]@10ms"]
    assert edge["bytes_per_token"] > 0 and edge["time_split"]["network"] > 0


def test_throughput_rows_replay_exactly(run):
    doc, _ = run
    rows = doc["throughput"]["rows"]
    assert [r["clients"] for r in rows] == [1, 2]
    assert all(all(r["greedy_equal"]) and r["server_tokens_per_s"] > 0 for r in rows)


def test_summary_counts_a_differing_run():
    def res(ids, t):
        return {
            "token_ids": ids,
            "new_tokens": len(ids),
            "total_s": t,
            "tokens_per_s": len(ids) / t,
            "decode_tokens_per_s": (len(ids) - 1) / t,
            "time_to_first_token_s": 0.0,
        }

    recs = [
        {
            "category": "c",
            "results": {"target": res([1, 2], 2.0), "x": res(ids, 1.0)},
            "greedy_equal": {"target": True, "x": ids == [1, 2]},
        }
        for ids in ([1, 2], [1, 3], [1, 2])
    ]
    s = summarise(recs, ["target", "x"], "target")["overall"]["x"]
    assert s["greedy_equal"] == {"equal": 2, "of": 3, "near_tie": 0}
    assert s["speedup"]["median"] == pytest.approx(2.0)


def test_resume_adds_the_missing_systems_and_keeps_every_record(tmp_path):
    tok = ByteTokenizer(300)
    target_model = tiny_llama(vocab=300, seed=0)
    target = TorchBackend(target_model, tok)
    setup = Setup(target, TorchBackend(perturbed(target_model, 0.08, seed=1), tok), "tinydraft")
    first = run_bench(_ns(tmp_path, "--drafters", "ngram"), setup, PROMPTS[:2])
    write_outputs(first, tmp_path)
    before = json.loads((tmp_path / "results.json").read_text())
    ns = _ns(tmp_path, "--drafters", "ngram,model", "--resume")
    doc = run_bench(ns, setup, PROMPTS)  # one prompt more than the first run had
    names = ["target", "spec[ngram]", "spec[tinydraft]"]
    assert [s["name"] for s in doc["systems"]] == names
    old, new = doc["prompts"][:2], doc["prompts"][2]
    for kept, rec in zip(before["prompts"], old):
        assert {k: v for k, v in rec.items() if k not in ("results", "greedy_equal")} == {
            k: v for k, v in kept.items() if k not in ("results", "greedy_equal")
        }
        assert {n: rec["results"][n] for n in names[:2]} == kept["results"]
        assert rec["greedy_equal"] == {**kept["greedy_equal"], "spec[tinydraft]": True}
        assert rec["order"] == kept["order"]  # the order the original run had
    assert set(new["results"]) == set(names) and len(new["order"]) == 3  # a whole new run
    (added,) = doc["added"]
    assert added["systems"] == ["spec[tinydraft]"] and added["prompts"] == {"spec[tinydraft]": 2}
    assert added["config"]["resume"] and set(added["load_avg"]) == {"start", "end"}
    assert doc["created"] == before["created"] and doc["command"] == before["command"]
    assert doc["summary"]["overall"]["spec[tinydraft]"]["prompts"] == 3
    report = (write_outputs(doc, tmp_path), (tmp_path / "report.md").read_text())[1]
    assert "`spec[tinydraft]` added on" in report and "not interleaved" in report
    with pytest.raises(ConfigError, match="max_new_tokens"):
        run_bench(_ns(tmp_path, "--resume", "--max-new-tokens", "9"), setup, PROMPTS)


def test_a_differing_run_is_located_and_its_tie_measured():
    from specsplit.bench.ties import annotate, top2_gap

    tok = ByteTokenizer(300)
    target = TorchBackend(tiny_llama(vocab=300, seed=0), tok)
    prompt = tok.encode("abc", add_special=False)
    base, other = [5, 6, 7, 8], [5, 6, 9, 8]
    doc = {
        "target": {"backend": "torch"},
        "baseline": "target",
        "prompts": [
            {
                "id": "p",
                "results": {"target": {"token_ids": base}, "x": {"token_ids": other}},
                "greedy_equal": {"target": True, "x": False},
            }
        ],
    }
    div = annotate(doc, target, {"p": prompt})["prompts"][0]["divergence"]
    assert set(div) == {"x"} and div["x"]["position"] == 2
    assert div["x"]["top2_gap"] == pytest.approx(top2_gap(target, prompt + [5, 6]))
    assert div["x"]["near_tie"] == (div["x"]["top2_gap"] < 2e-3)


def test_tree_system_beside_the_chain_with_its_limit_line(tmp_path):
    tok = ByteTokenizer(300)
    target_model = tiny_llama(vocab=300, seed=0)
    target = TorchBackend(target_model, tok)
    setup = Setup(target, TorchBackend(perturbed(target_model, 0.08, seed=1), tok), "tinydraft")
    ns = _ns(tmp_path, "--drafters", "model,tree", "--draft-tree", "3x3", "--k", "3")
    doc = run_bench(ns, setup, PROMPTS[:2])
    names = [s["name"] for s in doc["systems"]]
    assert names == ["target", "spec[tinydraft]", "tree[tinydraft]"]
    for rec in doc["prompts"]:
        assert rec["greedy_equal"]["tree[tinydraft]"] is True
    lim = doc["physical_limit"]["tree[tinydraft]"]
    assert lim["best_k"] >= 1 and lim["limit_speedup"] > 0
    write_outputs(doc, tmp_path)
    assert "tree[tinydraft]" in (tmp_path / "report.md").read_text()


def _limit_rows(asked: list[int]) -> list[dict]:
    """Ten prompts of a drafter that delivers 4 tokens in half its rounds and none in the
    other half, all accepted, beside the target alone (1 s per token)."""
    lengths = [0] + [4, 0] * 5  # (first: the prefill's token)
    run = {
        "target_passes": 11,
        "proposed": 20,
        "pos_proposed": [5, 5, 5, 5],
        "pos_accepted": [5, 5, 5, 5],
        "draft_lengths": lengths,
        "draft_asked": asked,
        "verify_s": 10.0,
        "draft_s": 0.0,
        "total_s": 11.0,
        "prefill_s": 1.0,
        "new_tokens": 31,
    }
    target = {"total_s": 11.0, "time_to_first_token_s": 1.0, "new_tokens": 11}
    return [{"results": {"ngram": dict(run), "target": target}} for _ in range(10)]


def test_the_limit_line_prices_a_fixed_k_by_the_tokens_the_drafter_delivers():
    from specsplit.bench.summary import physical_limit

    # rounds that asked for nothing: a fixed K = 4 gives 4 tokens a round -> 5 per pass
    lim = physical_limit(_limit_rows([0] + [4, 0] * 5), "ngram", "target")
    assert lim["best_k"] == 4 and lim["best_k_limit_speedup"] == pytest.approx(5.0)
    # rounds that asked for 4 and got none: a fixed K = 4 gives 1 + 0.5 * 4 = 3 per pass
    lim = physical_limit(_limit_rows([0] + [4] * 10), "ngram", "target")
    assert lim["best_k"] == 4 and lim["best_k_limit_speedup"] == pytest.approx(3.0)
    assert lim["expected_tokens_per_round"] == pytest.approx(3.0)  # as it ran
    # runs recorded before draft_asked: as the first
    old = _limit_rows([0] + [4] * 10)
    for r in old:
        del r["results"]["ngram"]["draft_asked"]
    lim = physical_limit(old, "ngram", "target")
    assert lim["best_k_limit_speedup"] == pytest.approx(5.0)
