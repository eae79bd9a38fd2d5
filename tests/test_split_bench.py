"""`python -m specsplit.bench.split throughput` end to end on tiny models: a real `specsplit
serve` process per max batch, split users replaying recorded drafts against cloud-only users
at each user count, the batching comparison; the results file's fields and exact replays."""

from __future__ import annotations

import json

import pytest

from conftest import perturbed, tiny_llama
from specsplit.bench import split


def _save(model, tok, folder) -> str:  # noqa: ANN001
    model.config.max_position_embeddings = 4096  # the bench loads with n_ctx 4096
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def capacity_run(tmp_path_factory):
    """One run with 1 and 2 users on a --max-batch 2 server, batching against --max-batch 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(297))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    root = tmp_path_factory.mktemp("capacity")
    target = tiny_llama(vocab=len(words), seed=0)
    target_dir = _save(target, tok, root / "target")
    draft_dir = _save(perturbed(target, 0.08, seed=1), tok, root / "draft")
    out = root / "out"
    argv = ["throughput", "--target", target_dir, "--target-backend", "torch"]
    argv += ["--draft", draft_dir, "--draft-backend", "torch", "--users", "1,2"]
    argv += ["--batch", "2,1", "--k", "3", "--max-new-tokens", "8", "--out", str(out)]
    assert split.main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_capacity_rows_split_and_cloud_only(capacity_run):
    res = capacity_run["results"]
    assert [r["users"] for r in res["users"]] == [1, 2]
    for r in res["users"]:
        for mode in ("split", "cloud_only"):
            row = r[mode]
            assert len(row["greedy_equal"]) == r["users"] and all(row["greedy_equal"])
            assert row["server_tokens_per_s"] > 0 and len(row["user_tokens_per_s"]) == r["users"]
            assert row["median_user_tokens_per_s"] > 0 and row["tokens"] > 0
            assert row["batched_passes"] > 0 and row["prefill_passes"] >= 1
        assert r["split_over_cloud_only"] == pytest.approx(
            r["split"]["server_tokens_per_s"] / r["cloud_only"]["server_tokens_per_s"]
        )
        assert r["per_user_split_over_cloud_only"] > 0
        # split's wall is at least its prefill: the bound is above the measured ratio
        assert 0 < r["split"]["all_first_tokens_s"] <= r["split"]["wall_s"]
        assert r["split_over_cloud_only_bound"] >= r["split_over_cloud_only"]
    assert set(res["split_over_cloud_only"]) == {"1", "2"}
    assert set(res["per_user_split_over_cloud_only"]) == {"1", "2"}


def test_capacity_batching_comparison(capacity_run):
    b = capacity_run["results"]["batching"]
    assert b["clients"] == 2
    on, off = b["max_batch=2"], b["max_batch=1"]
    assert all(on["greedy_equal"]) and all(off["greedy_equal"]) and len(off["greedy_equal"]) == 2
    assert off["mean_batch_size"] == pytest.approx(1.0)
    assert b["ratio_vs_max_batch=1"] == pytest.approx(
        on["server_tokens_per_s"] / off["server_tokens_per_s"]
    )
    assert b["decode_phase_ratio_vs_max_batch=1"] > 0
    assert b["bound_vs_max_batch=1"] >= b["ratio_vs_max_batch=1"]
    assert capacity_run["config"]["users"] == "1,2"
    # float32 tiny models: every text as recorded, so no client drafted for itself
    assert on["off_recording_rounds"] == off["off_recording_rounds"] == [0, 0]


class _Stub(split.Proposer):
    name = "stub"

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def propose(self, context, k, params, u):  # noqa: ANN001, ANN201
        self.seen.append(list(context))
        return split.Draft([7] * k)


def test_replay_off_the_recording_drafts_with_the_users_drafter():
    """On the recorded text a replaying client sends the recorded draft for that length;
    once the text leaves it (a near tie decided otherwise in a batched pass), the drafter
    given drafts for the actual text; without one, plain decoding (no draft)."""
    text = [1, 2, 3, 4, 5, 6]
    drafts = {3: [4, 5, 6], 4: [5, 6]}
    stub = _Stub()
    replay = split.ReplayProposer(drafts, text, off_recording=stub)
    assert replay.propose([1, 2, 3], 2, None, None).tokens == [4, 5]
    assert replay.propose([1, 2, 3, 4], 4, None, None).tokens == [5, 6]
    assert replay.off_rounds == 0 and stub.seen == []
    assert replay.propose([1, 2, 3, 9], 3, None, None).tokens == [7, 7, 7]
    assert replay.off_rounds == 1 and stub.seen == [[1, 2, 3, 9]]
    bare = split.ReplayProposer(drafts, text)
    assert bare.propose([1, 2, 3, 9], 3, None, None).tokens == []
