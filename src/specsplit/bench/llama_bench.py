"""llama.cpp's own ``llama-bench`` on the benchmark's GGUFs: prompt processing of 512 tokens
(pp512) and generation of 128 tokens (tg128), a reference line for the llama.cpp figures
(what the runtime does on this machine with nothing of specsplit around it).

    specsplit bench ... --llama-bench PATH   # stored as "llama_bench" in results.json
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

TESTS = {"pp512": (512, 0), "tg128": (0, 128)}  # name: (n_prompt, n_gen)


def llama_bench_command(binary: str, ggufs: list[str], threads: int, repetitions: int) -> list[str]:
    """One llama-bench call for every model: pp512 and tg128, JSON on stdout."""
    cmd = [binary]
    for g in ggufs:
        cmd += ["-m", g]
    return cmd + [
        *("-p", "512", "-n", "128", "-t", str(threads), "-r", str(repetitions), "-o", "json")
    ]


def parse_llama_bench(stdout: str, names: dict[str, str]) -> list[dict]:
    """Rows of llama-bench's JSON output (one per model and test); ``names`` maps a GGUF
    path to the model name shown."""
    rows = []
    for r in json.loads(stdout):
        test = next(
            (t for t, (p, g) in TESTS.items() if (r["n_prompt"], r["n_gen"]) == (p, g)), None
        )
        if test is None:
            continue
        path = r["model_filename"]
        rows.append(
            {
                "model": names.get(path, Path(path).stem),
                "gguf": Path(path).name,
                "model_type": r.get("model_type"),
                "test": test,
                "tokens_per_s": r["avg_ts"],
                "stddev_tokens_per_s": r.get("stddev_ts"),
                "samples_tokens_per_s": r.get("samples_ts"),
                "threads": r.get("n_threads"),
                "flash_attn": r.get("flash_attn"),
            }
        )
    return rows


def run_llama_bench(
    binary: str, models: dict[str, str], threads: int, repetitions: int = 5
) -> dict:
    """Run llama-bench on ``models`` (name: GGUF path); the ``llama_bench`` block of the
    results document (docs/bench_results.md)."""
    ggufs = list(models.values())
    cmd = llama_bench_command(binary, ggufs, threads, repetitions)
    load = os.getloadavg()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({p.returncode}): {p.stderr.strip()[-300:]}")
    raw = json.loads(p.stdout)
    return {
        "command": " ".join(Path(x).name if x in ggufs or x == binary else x for x in cmd),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "build": {k: raw[0].get(k) for k in ("build_commit", "build_number")} if raw else None,
        "threads": threads,
        "repetitions": repetitions,
        "load_avg": {"start": list(load), "end": list(os.getloadavg())},
        "rows": parse_llama_bench(p.stdout, {v: k for k, v in models.items()}),
    }


def reference_line(block: dict | None) -> str | None:
    """The report's one line: every model's pp512 and tg128 tokens/s (mean ± sd)."""
    if not block or not block.get("rows"):
        return None
    per: dict[str, list[str]] = {}
    for r in block["rows"]:
        sd = r.get("stddev_tokens_per_s")
        fig = f"{r['tokens_per_s']:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")
        per.setdefault(r["model"], []).append(f"{r['test']} {fig}")
    models = "; ".join(f"{m} {', '.join(v)} tok/s" for m, v in per.items())
    build = (block.get("build") or {}).get("build_commit")
    return (
        f"llama.cpp's own `llama-bench` ({block.get('threads')} threads, "
        f"{block.get('repetitions')} repetitions{f', build {build}' if build else ''}): {models}."
    )
