"""llama.cpp's own tools in `specsplit bench`: llama-speculative's output parsed from a
captured run and counted like every system's, its system driven through a stand-in
binary, and llama-bench's JSON as a reference line."""

from __future__ import annotations

import json
import stat
import sys
import textwrap

import pytest

from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.bench.llama_bench import llama_bench_command, parse_llama_bench, reference_line
from specsplit.bench.systems import (
    LlamaSpeculativeSystem,
    llama_speculative_figures,
    parse_llama_speculative,
)

# Captured from llama-speculative (the llama.cpp of llama-cpp-python 0.3.36) on the
# Qwen2.5-Coder 1.5B target and 0.5B draft, 2 threads, greedy, -n 11 (max_new 12), on a
# loaded machine: the prompt as the harness gives it, then stdout and stderr verbatim.
PROMPT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\n<|im_start|>user\nWrite a Python function square(x) that returns "
    "x squared. Code only.<|im_end|>\n<|im_start|>assistant\n"
)
STDOUT = "\n\n" + PROMPT + "```python\ndef square(x):\n    return x * x\n\n\n\n\n"
STDERR = """\
0.02.587.810 W load: control-looking token: 128247 '</s>' was not control-type; this is probably a bug in the model. its type will be overridden
0.04.390.397 I cmn          init: llama threadpool init, n_threads = 2
0.07.764.915 W load: control-looking token: 128247 '</s>' was not control-type; this is probably a bug in the model. its type will be overridden
0.08.213.865 I cmn          init: llama threadpool init, n_threads = 2
0.22.212.957 I encoded   44 tokens in    8.170 seconds, speed:    5.386 t/s
0.22.213.019 I decoded   13 tokens in    5.256 seconds, speed:    2.473 t/s
0.22.213.067 I 
0.22.213.115 I n_draft   = 3
0.22.213.163 I n_predict = 13
0.22.213.212 I n_drafted = 9
0.22.213.261 I n_accept  = 9
0.22.213.284 I accept    = 100.000%
0.22.213.284 I 
0.22.213.285 I draft:

0.22.213.292 I 
0.22.213.293 I target:

0.22.213.296 I common_perf_print:    sampling time =       3.86 ms
0.22.213.297 I common_perf_print:    samplers time =       1.15 ms /    13 tokens
0.22.213.298 I common_perf_print:        load time =    2874.03 ms
0.22.213.299 I common_perf_print: prompt eval time =    9250.22 ms /    56 tokens (  165.18 ms per token,     6.05 tokens per second)
0.22.213.301 I common_perf_print:        eval time =       0.00 ms /     1 runs   (    0.00 ms per token,      inf tokens per second)
0.22.213.301 I common_perf_print:       total time =   17089.22 ms /    57 tokens
0.22.213.302 I common_perf_print: unaccounted time =    7835.14 ms /  45.8 %      (total - sampling - prompt eval - eval) / (total)
0.22.213.303 I common_perf_print:    graphs reused =          2
"""  # noqa: E501, W291
# the Qwen tokenizer's ids of the printed text, and Qwen's <|endoftext|> and <|im_end|>
TEXT_IDS = [73594, 12669, 198, 750, 9334, 2075, 982, 262, 470, 856, 353, 856, 198]
QWEN_EOS = frozenset({151643, 151645})


def test_llama_speculative_output_is_parsed():
    raw = parse_llama_speculative(STDOUT, STDERR, PROMPT)
    assert raw["text"] == "```python\ndef square(x):\n    return x * x\n"
    assert raw["prompt_tokens"] == 44
    assert (raw["encode_s"], raw["decode_s"]) == (8.170, 5.256)
    assert (raw["n_draft"], raw["n_predict"], raw["n_drafted"], raw["n_accept"]) == (3, 13, 9, 9)


def test_llama_speculative_output_must_echo_the_prompt_and_summarise():
    with pytest.raises(ValueError, match="echo"):
        parse_llama_speculative(STDOUT, STDERR, PROMPT.replace("square", "cube"))
    with pytest.raises(ValueError, match="n_accept"):
        parse_llama_speculative(STDOUT, STDERR.replace("n_accept", "n_acc"), PROMPT)


def test_llama_speculative_figures_are_cut_at_max_new_and_counted_like_every_system():
    raw = parse_llama_speculative(STDOUT, STDERR, PROMPT)
    r = llama_speculative_figures(raw, TEXT_IDS, QWEN_EOS, 12)
    assert r["token_ids"] == TEXT_IDS[:12] and r["new_tokens"] == 12
    # it generated 13 (a whole round past -n): the 12 counted take 12/13 of its decode time
    assert r["total_s"] == pytest.approx(8.170 + 5.256 * 12 / 13)
    assert r["time_to_first_token_s"] == pytest.approx(8.170)
    assert r["tokens_per_s"] == pytest.approx(12 / r["total_s"])
    assert r["decode_tokens_per_s"] == pytest.approx(11 / (5.256 * 12 / 13))
    # 13 tokens = the first (from the prefill) + 9 accepted + one per pass: 3 passes
    assert (r["target_passes"], r["proposed"], r["accepted"]) == (3, 9, 9)
    assert r["acceptance_rate"] == 1.0 and r["mean_accepted_length"] == pytest.approx(13 / 3)
    assert r["reported"]["n_predict"] == 13 and "text" not in r["reported"]


def test_llama_speculative_eos_counts_once_and_only_within_max_new():
    # captured too: 'Reply with the word "hello" and nothing else.' -> "Hello<|im_end|>"
    raw = {
        "prompt_tokens": 40,
        "encode_s": 5.868,
        "decode_s": 3.276,
        "n_predict": 2,
        "n_draft": 3,
        "n_drafted": 3,
        "n_accept": 0,
    }
    r = llama_speculative_figures(raw, [9707, 151645], QWEN_EOS, 16)
    assert r["token_ids"] == [9707] and r["new_tokens"] == 2
    assert r["total_s"] == pytest.approx(5.868 + 3.276)
    assert (r["target_passes"], r["acceptance_rate"]) == (1, 0.0)
    late = llama_speculative_figures({**raw, "n_predict": 4}, [1, 2, 3, 151645], QWEN_EOS, 2)
    assert late["token_ids"] == [1, 2] and late["new_tokens"] == 2


FAKE = """\
#!{python}
# a stand-in for llama-speculative: records its arguments, prints like the real one
import json, os, sys
args = sys.argv[1:]
json.dump(args, open({argv!r}, "w"))
prompt = args[args.index("-p") + 1]
n = len(prompt.encode()) + int(os.environ.get("FAKE_SHIFT", "0"))
sys.stdout.write("\\n\\n" + prompt + "ok!" + "\\n\\n\\n\\n")
sys.stderr.write(
    f"encoded {{n}} tokens in 0.500 seconds, speed: 1 t/s\\n"
    "decoded 3 tokens in 0.300 seconds, speed: 10 t/s\\n"
    "n_draft   = 3\\nn_predict = 3\\nn_drafted = 3\\nn_accept  = 1\\n"
)
"""


@pytest.fixture
def fake_binary(tmp_path):
    path, argv = tmp_path / "llama-speculative", tmp_path / "argv.json"
    path.write_text(FAKE.format(python=sys.executable, argv=str(argv)))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path, argv


def test_llama_speculative_system_runs_the_binary_on_the_same_prompt(fake_binary):
    path, argv = fake_binary
    tok = ByteTokenizer(300)
    ids = tok.encode("hi\\n <there>", add_special=False)
    system = LlamaSpeculativeSystem(
        "llama-speculative",
        binary=str(path),
        target_gguf="t.gguf",
        draft_gguf="d.gguf",
        threads=2,
        n_ctx=512,
        tokenizer=tok,
    )
    r = system.run(ids, 2)
    assert r["token_ids"] == list(b"ok") and r["new_tokens"] == 2
    assert r["total_s"] == pytest.approx(0.5 + 0.3 * 2 / 3)
    assert system.describe()["kind"] == "llama-speculative"
    assert "re-tokenized" in system.describe()["note"]
    args = json.loads(argv.read_text())
    opt = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("-")}
    assert opt["-p"] == "hi\\n <there>" and "--no-escape" in args  # the text, unescaped
    assert (opt["-m"], opt["-md"], opt["-c"], opt["--temp"]) == ("t.gguf", "d.gguf", "512", "0")
    assert opt["-n"] == "1"  # it stops after generating more than -n
    assert all(opt[t] == "2" for t in ("-t", "-tb", "-td", "-tbd"))
    assert opt["--spec-draft-n-max"] == "3"


def test_llama_speculative_system_refuses_another_prompt_length(fake_binary, monkeypatch):
    path, _ = fake_binary
    tok = ByteTokenizer(300)
    system = LlamaSpeculativeSystem("llama-speculative", binary=str(path), tokenizer=tok)
    monkeypatch.setenv("FAKE_SHIFT", "1")  # as if a BOS were added or a special token split
    with pytest.raises(RuntimeError, match="read the prompt as"):
        system.run(tok.encode("abc", add_special=False), 2)


LLAMA_BENCH_JSON = textwrap.dedent(
    """\
    [
      {"build_commit": "0c1e570", "build_number": 1, "model_filename": "/m/t.gguf",
       "model_type": "qwen2 1.5B Q4_K - Medium", "n_threads": 2, "flash_attn": -1,
       "n_prompt": 512, "n_gen": 0, "avg_ts": 61.25, "stddev_ts": 0.5,
       "samples_ts": [61.0, 61.5]},
      {"build_commit": "0c1e570", "build_number": 1, "model_filename": "/m/t.gguf",
       "model_type": "qwen2 1.5B Q4_K - Medium", "n_threads": 2, "flash_attn": -1,
       "n_prompt": 0, "n_gen": 128, "avg_ts": 20.5, "stddev_ts": 0.25,
       "samples_ts": [20.25, 20.75]},
      {"build_commit": "0c1e570", "build_number": 1, "model_filename": "/m/d.gguf",
       "model_type": "qwen2 0.5B Q4_K - Medium", "n_threads": 2, "flash_attn": -1,
       "n_prompt": 512, "n_gen": 0, "avg_ts": 180.0, "stddev_ts": 2.0,
       "samples_ts": [178.0, 182.0]}
    ]"""
)


def test_llama_bench_rows_and_reference_line():
    cmd = llama_bench_command("/x/llama-bench", ["/m/t.gguf", "/m/d.gguf"], 2, 5)
    assert cmd[:5] == ["/x/llama-bench", "-m", "/m/t.gguf", "-m", "/m/d.gguf"]
    assert " ".join(cmd[5:]) == "-p 512 -n 128 -t 2 -r 5 -o json"
    rows = parse_llama_bench(LLAMA_BENCH_JSON, {"/m/t.gguf": "target-1.5b"})
    assert [(r["model"], r["test"], r["tokens_per_s"]) for r in rows] == [
        ("target-1.5b", "pp512", 61.25),
        ("target-1.5b", "tg128", 20.5),
        ("d", "pp512", 180.0),
    ]
    line = reference_line(
        {"threads": 2, "repetitions": 5, "build": {"build_commit": "0c1e570"}, "rows": rows}
    )
    assert line == (
        "llama.cpp's own `llama-bench` (2 threads, 5 repetitions, build 0c1e570): "
        "target-1.5b pp512 61.2 ± 0.5, tg128 20.5 ± 0.2 tok/s; d pp512 180.0 ± 2.0 tok/s."
    )
    assert reference_line(None) is None
