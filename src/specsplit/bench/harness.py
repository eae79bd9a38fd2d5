"""`specsplit bench`: speculative decoding against the target alone and the tools people use
today, side by side on the same prompts, with a report.

Every system runs every prompt once per repeat, interleaved in a rotating order, after an
untimed warm-up. The speedup of a run is its tokens/s over the baseline's (the target
alone) on the same prompt and repeat. Systems and figures: ``bench_systems``; summaries
and the physical limit: ``bench_summary``; files and plots: ``bench_report``; the schema:
docs/bench_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from specsplit import registry
from specsplit.backends.load import DTYPES
from specsplit.bench.prompts import csv_list, load_prompts
from specsplit.bench.summary import refresh, spread
from specsplit.bench.systems import (
    CloudSystem,
    EdgeSystem,
    EngineSystem,
    HFSystem,
    LlamaCppPythonSystem,
    LlamaSpeculativeSystem,
    System,
)
from specsplit.engine.speculative import SpeculativeEngine
from specsplit.engine.tree_policy import tree_policy
from specsplit.errors import ConfigError
from specsplit.faces.settings import parse_k

SCHEMA = "specsplit.bench/2"


@dataclass
class Setup:
    """What the systems are built from: loaded models and, for the split systems, a server."""

    target: object  # Backend
    draft: object | None = None  # draft model Backend
    draft_name: str = "draft"
    assistant: object | None = None  # HF assistant (a torch model) for hf-assisted
    server: tuple[str, int] | None = None  # a specsplit server verifying for the target
    server_http_port: int | None = None  # its /metrics
    server_pid: int | None = None
    gguf: Path | None = None  # the target's GGUF (llama-cpp-python systems)
    draft_gguf: Path | None = None
    model_rss_bytes: dict[str, int] = field(default_factory=dict)
    proxies: list = field(default_factory=list)


def add_bench_parser(sub) -> None:  # noqa: ANN001
    b = sub.add_parser("bench", help="benchmark specsplit against the target alone and others")
    b.add_argument("--suite", default="humaneval,spec-bench", help="humaneval, spec-bench or both")
    b.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    b.add_argument("--categories", default=None, help="comma-separated Spec-Bench categories")
    b.add_argument("--limit", type=int, default=None, help="prompts per category")
    b.add_argument("--humaneval-limit", type=int, default=None, help="HumanEval prompts")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--target", default="qwen2.5-coder-1.5b")
    b.add_argument("--target-backend", default="torch", choices=["torch", "llama.cpp", "numpy"])
    b.add_argument("--draft", default="qwen2.5-coder-0.5b-iq4_nl", help="draft model")
    b.add_argument("--draft-backend", default="llama.cpp", choices=["torch", "llama.cpp", "numpy"])
    b.add_argument("--threads", type=int, default=None, help="threads of every model")
    b.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="number type of a torch target and of the HF assistant (default float32)",
    )
    b.add_argument("--k", default="auto", help="K of the specsplit systems: a number or auto")
    b.add_argument(
        "--drafters",
        default="model,ngram,both",
        help="specsplit local systems: model, ngram, both (model+ngram), tree (the draft model's "
        "token tree, shaped by --draft-tree)",
    )
    b.add_argument(
        "--draft-tree", default="auto", help="the tree system's shape: auto or WIDTHxDEPTH"
    )
    b.add_argument("--rtt", default="", help="edge-cloud round-trip times in ms, e.g. 0,20,80")
    b.add_argument("--cloud-rtt", default=None, help="cloud-only RTTs (default: as --rtt)")
    b.add_argument("--hf", default="", help="HF systems: assisted, prompt-lookup")
    b.add_argument(
        "--llama-cpp-python", default="", help="llama-cpp-python systems: plain, prompt-lookup"
    )
    b.add_argument("--llama-speculative", default=None, help="path of a llama-speculative binary")
    b.add_argument("--clients", default="", help="server throughput at these client counts")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument(
        "--llama-bench", default=None, help="path of llama.cpp's llama-bench: a reference"
    )
    b.add_argument(
        "--resume",
        action="store_true",
        help="keep the prompts a run in --out finished (partial.json or results.json) and run "
        "on them only the systems missing from their records",
    )
    b.set_defaults(func=cmd_bench)
    r = sub.add_parser("bench-report", help="one report from several bench runs")
    r.add_argument("runs", nargs="+", help="result folders or results.json files")
    r.add_argument("--out", required=True)
    r.add_argument("--readme", default=None, help="also update this README's bench section")
    r.set_defaults(func=cmd_report)


def _tree_system(ns: argparse.Namespace, setup: Setup, skipped: list[dict]) -> list[System]:
    """tree[draft]: the draft model proposes a token tree each round (shape: --draft-tree)."""
    from specsplit.proposers.draft_model import DraftModelProposer

    name = f"tree[{setup.draft_name}]"
    if setup.draft is None or not setup.target.supports_tree:
        why = "no draft model" if setup.draft is None else f"{setup.target.name}: no tree"
        skipped.append({"name": name, "reason": why})
        return []
    policy = tree_policy(ns.draft_tree) or tree_policy("auto")
    engine = SpeculativeEngine(setup.target, [DraftModelProposer(setup.draft)], policy=policy)
    return [EngineSystem(name, "specsplit-local", engine, f"{setup.draft_name} tree")]


def build_systems(ns: argparse.Namespace, setup: Setup) -> tuple[list[System], list[dict]]:
    """The systems of this run, and the ones skipped with the reason."""
    from specsplit.proposers.draft_model import DraftModelProposer
    from specsplit.proposers.ngram import NGramProposer

    target, k = setup.target, parse_k(ns.k)
    systems: list[System] = [EngineSystem("target", "target", SpeculativeEngine(target), None)]
    skipped: list[dict] = []
    d = setup.draft_name
    for which in csv_list(ns.drafters):
        if which == "tree":
            systems += _tree_system(ns, setup, skipped)
            continue
        if which in ("model", "both") and setup.draft is None:
            skipped.append({"name": f"spec[{which}]", "reason": "no draft model"})
            continue
        props = {
            "model": lambda: [DraftModelProposer(setup.draft)],
            "ngram": lambda: [NGramProposer()],
            "both": lambda: [DraftModelProposer(setup.draft), NGramProposer()],
        }[which]()
        label = {"model": d, "ngram": "ngram", "both": f"{d}+ngram"}[which]
        if len(props) > 1 and not target.supports_tree:
            skipped.append({"name": f"spec[{label}]", "reason": f"{target.name}: no tree"})
            continue
        engine = SpeculativeEngine(target, props, k=k)
        systems.append(EngineSystem(f"spec[{label}]", "specsplit-local", engine, label))
    rtts, cloud = csv_list(ns.rtt), csv_list(ns.rtt if ns.cloud_rtt is None else ns.cloud_rtt)
    if (rtts or cloud) and setup.server is None:
        skipped.append({"name": "edge-cloud/cloud-only", "reason": "no server"})
        rtts, cloud = [], []
    systems += _split_systems(setup, [float(r) for r in rtts], [float(r) for r in cloud], k)
    systems += _hf_systems(ns, setup, skipped)
    systems += _llama_systems(ns, setup, skipped)
    return systems, skipped


def _split_systems(setup: Setup, rtts: list[float], cloud: list[float], k) -> list[System]:  # noqa: ANN001
    from specsplit.engine.speculative import DecodeLoop, default_policy
    from specsplit.proposers.draft_model import DraftModelProposer
    from specsplit.transport.client import RemoteVerifier
    from specsplit.transport.netshim import DelayProxy

    out: list[System] = []
    tok = setup.target.tokenizer
    proxies: dict[float, DelayProxy] = {}

    def proxy(r: float) -> DelayProxy:
        if r not in proxies:
            proxies[r] = DelayProxy(setup.server, r / 2000).start()  # one way = half the RTT
            setup.proxies.append(proxies[r])
        return proxies[r]

    for r in rtts:
        if setup.draft is None:
            break
        prop = DraftModelProposer(setup.draft, top_m=64, quantize=True)
        prop.warm_up([tok.bos_token_id or 0] * 32)
        verifier = RemoteVerifier([f"127.0.0.1:{proxy(r).port}"], tok)
        policy = default_policy([prop], k, 16)
        if hasattr(policy, "draft_per_token"):
            policy.draft_per_token = prop.cost_per_token
        loop = DecodeLoop(verifier, [prop], policy)
        out.append(
            EdgeSystem(f"edge[{setup.draft_name}]@{r:g}ms", loop, proxy(r), setup.draft_name, r)
        )
    for r in cloud:
        out.append(CloudSystem(f"cloud-only@{r:g}ms", proxy(r), tok.fingerprint(), r))
    return out


def _hf_systems(ns: argparse.Namespace, setup: Setup, skipped: list[dict]) -> list[System]:
    out: list[System] = []
    model = getattr(setup.target, "model", None)
    eos = sorted(setup.target.tokenizer.eos_token_ids) or [0]
    assistant = registry.source_model(setup.draft_name)  # (see cmd_bench)
    for h in csv_list(ns.hf):
        name = {"assisted": f"hf-assisted[{assistant}]", "prompt-lookup": "hf-prompt-lookup"}
        if h not in name:
            raise ConfigError(f"unknown HF system {h!r}; choose assisted, prompt-lookup")
        if model is None:
            skipped.append(
                {"name": name[h], "reason": "HF generate needs the torch target backend"}
            )
        elif h == "assisted" and setup.assistant is None:
            skipped.append({"name": name[h], "reason": "no torch draft model to assist"})
        elif h == "assisted":
            out.append(HFSystem(name[h], model, eos, assistant=setup.assistant))
        else:
            out.append(HFSystem(name[h], model, eos, prompt_lookup=10))
    return out


def _llama_systems(ns: argparse.Namespace, setup: Setup, skipped: list[dict]) -> list[System]:
    out: list[System] = []
    threads = ns.threads or len(os.sched_getaffinity(0))
    for which in csv_list(ns.llama_cpp_python):
        name = "llama-cpp-python" + ("-prompt-lookup" if which == "prompt-lookup" else "")
        if which not in ("plain", "prompt-lookup"):
            raise ConfigError(f"unknown llama-cpp-python system {which!r}; plain, prompt-lookup")
        if setup.target.name != "llama.cpp" or setup.gguf is None:
            skipped.append(
                {
                    "name": name,
                    "reason": "compared on the llama.cpp target backend (its baseline there)",
                }
            )
            continue
        lookup = 10 if which == "prompt-lookup" else 0
        out.append(LlamaCppPythonSystem(name, setup.gguf, threads, setup.target.n_ctx, lookup))
    if ns.llama_speculative:
        if setup.gguf is None or setup.draft_gguf is None:
            raise ConfigError("llama-speculative needs the target's and the draft's GGUF")
        out.append(
            LlamaSpeculativeSystem(
                "llama-speculative",
                drafter=setup.draft_name,
                binary=ns.llama_speculative,
                target_gguf=str(setup.gguf),
                draft_gguf=str(setup.draft_gguf),
                threads=threads,
                n_ctx=getattr(setup.target, "n_ctx", 4096),
                tokenizer=setup.target.tokenizer,
            )
        )
    else:
        skipped.append(
            {"name": "llama-speculative", "reason": "no --llama-speculative binary given"}
        )
    return out


# settings that make an earlier run's results incomparable with this one's
RESUME_KEYS = (
    "max_new_tokens",
    "target",
    "target_backend",
    "draft",
    "draft_backend",
    "threads",
    "k",
    "dtype",
)


def _resumed(ns: argparse.Namespace) -> tuple[dict | None, list[dict]]:
    """With --resume: the results document of a finished run in --out (results.json, or
    None) and the prompt records to keep: partial.json's (an interrupted run, or
    systems being added) or else the document's."""
    if not getattr(ns, "resume", False):
        return None, []
    doc_path, partial = Path(ns.out, "results.json"), Path(ns.out, "partial.json")
    doc = json.loads(doc_path.read_text()) if doc_path.exists() else None
    if doc is not None:
        cfg = doc.get("config") or {}
        diff = [k for k in RESUME_KEYS if k in cfg and cfg[k] != getattr(ns, k, None)]
        if diff:
            was = ", ".join(f"{k} {cfg[k]!r} (now {getattr(ns, k, None)!r})" for k in diff)
            raise ConfigError(f"--resume: {doc_path} was made with other settings: {was}")
    stale = (
        doc is not None and partial.exists() and partial.stat().st_mtime <= doc_path.stat().st_mtime
    )
    if partial.exists() and not stale:  # a checkpoint of a run cut short after the document
        return doc, json.loads(partial.read_text())
    return doc, list(doc["prompts"]) if doc else []


@contextmanager
def _recording(proposer, drafts: dict[int, list[int]]) -> Iterator[None]:  # noqa: ANN001
    """Record every draft the proposer makes, by the length of the context it drafted for."""
    inner = proposer.propose

    def propose(context, k, params, u):  # noqa: ANN001, ANN202
        d = inner(context, k, params, u)
        drafts[len(context)] = list(d.tokens)
        return d

    proposer.propose = propose
    try:
        yield
    finally:
        del proposer.propose


def run_bench(ns: argparse.Namespace, setup: Setup, prompts: list) -> dict:
    """Run every system on every prompt; the results document (without file output).

    With --resume, a prompt an earlier run finished keeps its record as it was and gets
    only the systems missing from it (run in a rotating order among themselves); their
    speedup then divides by the baseline of that earlier run. The document says which
    systems were added so (``added``)."""
    from tqdm import tqdm

    from specsplit.faces.api import SpeculativeDecoder

    load_start = os.getloadavg()
    systems, skipped = build_systems(ns, setup)
    base_doc, records = _resumed(ns)
    done = {(r["id"], r["repeat"]): r for r in records}
    todo = []  # (repeat, prompt index, prompt, record kept or None, systems to run)
    for rep in range(ns.repeats):
        for i, p in enumerate(prompts):
            rec = done.get((p.id, rep))
            missing = [s for s in systems if rec is None or s.name not in rec["results"]]
            if missing:
                todo.append((rep, i, p, rec, missing))
    encoder = SpeculativeDecoder(setup.target, None, warm_up=False)
    warm = encoder.encode_prompt(prompts[0].text)
    active = {s.name for *_, missing in todo for s in missing}
    for s in systems:  # untimed warm-up of the systems that will run
        if s.name not in active:
            continue
        if isinstance(s, EngineSystem):
            s.engine.warm_up(warm[:64])
        s.run(warm[:64], 8)
    names = [s.name for s in systems]
    main = next((s.name for s in systems if s.kind == "specsplit-local"), names[-1])
    recorder = next((s for s in systems if s.name == f"spec[{setup.draft_name}]"), None)
    n_record = max((int(c) for c in csv_list(ns.clients)), default=0)
    recorded: list[dict] = []
    added: dict[str, int] = {}  # systems run on a kept record: how many records
    errors: list[dict] = []
    bar = tqdm(total=sum(len(m) for *_, m in todo), unit="run", file=sys.stderr)
    for rep, i, p, rec, missing in todo:
        ids = encoder.encode_prompt(p.text)
        shift = (i + rep) % len(missing)
        order = missing[shift:] + missing[:shift]
        results, drafts = {}, {}
        for s in order:
            if s is recorder and rec is None and rep == 0 and len(recorded) < n_record:
                with _recording(s.engine.proposers[0], drafts):
                    results[s.name] = s.run(ids, ns.max_new_tokens)
                recorded.append(
                    {
                        "prompt_ids": ids,
                        "output_ids": results[s.name]["token_ids"],
                        "drafts": {str(n): d for n, d in drafts.items()},
                    }
                )
            else:
                try:
                    results[s.name] = s.run(ids, ns.max_new_tokens)
                except Exception as e:  # noqa: BLE001 - one system failing is a result
                    if s.kind in ("target", "specsplit-local"):
                        raise
                    errors.append({"system": s.name, "id": p.id, "error": repr(e)[:300]})
            bar.update(1)
        if rec is None:
            rec = {
                "id": p.id,
                "category": p.category,
                "repeat": rep,
                "prompt_tokens": len(ids),
                "order": [s.name for s in order],
                "results": {},
                "greedy_equal": {},
            }
            records.append(rec)
        else:
            if rec["prompt_tokens"] != len(ids):
                raise ConfigError(f"--resume: {p.id} is not the prompt the earlier run had")
            for name in results:
                added[name] = added.get(name, 0) + 1
        rec["results"].update(results)
        base = rec["results"]["target"]["token_ids"]
        rec["greedy_equal"].update(
            {
                s: (None if r["token_ids"] is None else r["token_ids"] == base)
                for s, r in results.items()
            }
        )
        ratios = [
            r["results"][main]["tokens_per_s"] / r["results"]["target"]["tokens_per_s"]
            for r in records
            if main in r["results"]
        ]
        if ratios:
            bar.set_postfix_str(f"{main} median speedup {spread(ratios)['median']:.2f}x")
        if getattr(ns, "out", None):  # a checkpoint, should the run be cut short
            Path(ns.out, "partial.json").write_text(json.dumps(records))
    bar.close()
    throughput = None
    if recorded and setup.server:
        try:
            throughput = _throughput(ns, setup, recorded)
        except Exception as e:  # noqa: BLE001 - keep the prompt results
            throughput = {"error": f"{type(e).__name__}: {e}"}
    for s in systems:
        s.close()
    from specsplit.bench.split import rss_bytes

    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": _command(ns),
        "machine": _machine(),
        "config": {k: v for k, v in vars(ns).items() if k != "func"},
        "target": {
            "name": ns.target,
            "backend": setup.target.name,
            "dtype": _dtype_name(setup.target),
        },
        "baseline": "target",
        "systems": [s.describe() for s in systems],
        "skipped": skipped,
        "errors": errors,
        "prompts": records,
        "memory": {
            "bench_process_peak_bytes": rss_bytes(os.getpid())[1],
            "server_process_peak_bytes": rss_bytes(setup.server_pid)[1]
            if setup.server_pid
            else None,
            "model_rss_bytes": setup.model_rss_bytes,
        },
        "throughput": throughput,
        "load_avg": {"start": list(load_start), "end": list(os.getloadavg())},
    }
    return refresh(_merged(base_doc, doc, added))


def _command(ns: argparse.Namespace) -> str | None:
    """The command line of a CLI run, quoted for a shell."""
    return "specsplit " + shlex.join(sys.argv[1:]) if ns.__dict__.get("func") else None


def _merged(base: dict | None, doc: dict, added: dict[str, int]) -> dict:
    """This run's document, or, resuming a finished run, that run's document with this
    run's records, new systems, skips and errors merged in. Systems run on records an
    earlier run made are listed under ``added`` with this run's command, machine and load."""
    if added:
        order = [s["name"] for s in doc["systems"]]
        entry = {
            "systems": sorted(added, key=order.index),
            "prompts": {name: added[name] for name in sorted(added, key=order.index)},
            **{k: doc[k] for k in ("created", "command", "machine", "config", "load_avg")},
        }
    if base is None:
        if added:
            doc["added"] = [entry]
        return doc
    out = dict(base)
    have = {s["name"] for s in base["systems"]}
    out["systems"] = base["systems"] + [s for s in doc["systems"] if s["name"] not in have]
    ran = {s["name"] for s in out["systems"]}
    skips = base.get("skipped", []) + [
        s for s in doc["skipped"] if s["name"] not in {x["name"] for x in base.get("skipped", [])}
    ]
    out["skipped"] = [s for s in skips if s["name"] not in ran]
    out["errors"] = base.get("errors", []) + doc["errors"]
    out["prompts"] = doc["prompts"]
    if not out.get("throughput"):
        out["throughput"] = doc["throughput"]
    if added:
        out["added"] = [*base.get("added", []), entry]
    return out


def _throughput(ns: argparse.Namespace, setup: Setup, recorded: list[dict]) -> dict:
    """Replaying clients against the server, for each client count."""
    from specsplit.bench.split import replay_clients

    address = f"{setup.server[0]}:{setup.server[1]}"
    rows = []
    for c in (int(x) for x in csv_list(ns.clients)):
        recs = [recorded[i % len(recorded)] for i in range(c)]
        row = replay_clients(
            address, setup.server_http_port, setup.target.tokenizer, recs, 16, ns.max_new_tokens
        )
        rows.append({"clients": c, **row})
    return {"max_batch": 8, "k": 16, "rows": rows}


def _machine() -> dict:
    out = {
        "cpus": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
    }
    try:  # the code that ran: commit, and whether the work tree differed from it
        git = ["git", "-C", str(Path(__file__).parent)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "-uno"], capture_output=True, text=True
        )
        out["commit"] = head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") or None
    except OSError:
        out["commit"] = None
    for mod in ("torch", "transformers", "llama_cpp"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - an optional package
            out[mod] = None
    return out


def _cpu_model() -> str | None:
    """The CPU's model name (Linux), to tell machines apart."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
        None,
    )


def write_outputs(doc: dict, out: Path) -> None:
    """results.json, results.csv, plots and report.md in out."""
    from specsplit.bench.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    write_report([doc], out)


@contextmanager
def _server(ns: argparse.Namespace, out: Path) -> Iterator[tuple | None]:
    """`specsplit serve` in a subprocess when a split system or throughput needs it."""
    if not (csv_list(ns.rtt) or csv_list(ns.cloud_rtt) or csv_list(ns.clients)):
        yield None
        return
    from specsplit.bench.split import free_port, serve_args, start_server, stop_server

    port, http = free_port(), free_port()
    extra = ["--max-batch", "8", "--max-sessions", "64", "--http-port", str(http)]
    if ns.threads:
        extra += ["--threads", str(ns.threads)]
    proc = start_server(serve_args(ns, *extra), port, out / "server.log")
    try:
        yield ("127.0.0.1", port), http, proc.pid
    finally:
        stop_server(proc)


def _dtype_name(backend) -> str | None:  # noqa: ANN001 - a Backend
    """A torch backend's number type ("bfloat16"); None for the others (their GGUF's)."""
    model = getattr(backend, "model", None)
    dtype = getattr(model, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def cmd_bench(ns: argparse.Namespace) -> int:
    from specsplit.backends.load import load_backend
    from specsplit.bench.split import rss_bytes

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(ns)
    rss: dict[str, int] = {}

    def load(what: str, fn):  # noqa: ANN001, ANN202
        before = rss_bytes(os.getpid())[0]
        obj = fn()
        rss[what] = rss_bytes(os.getpid())[0] - before
        return obj

    target = load(
        f"target {ns.target} ({ns.target_backend})",
        lambda: load_backend(
            ns.target_backend, ns.target, threads=ns.threads, n_ctx=4096, dtype=ns.dtype
        ),
    )
    draft = load(
        f"draft {ns.draft} ({ns.draft_backend})",
        lambda: load_backend(ns.draft_backend, ns.draft, threads=ns.threads, n_ctx=4096),
    )
    assistant = None
    if "assisted" in csv_list(ns.hf) and ns.target_backend == "torch":
        from specsplit.backends.torch_backend import TorchBackend

        # the assistant takes the draft's weights as they were published (a model requantized
        # here for llama.cpp's kernels would only lose precision in float)
        source = registry.source_model(ns.draft)
        assistant = load(
            f"HF assistant {source} (torch)",
            lambda: (
                TorchBackend.load(source, threads=ns.threads, dtype=ns.dtype or "float32").model
            ),
        )
    gguf = draft_gguf = None
    if ns.target_backend == "llama.cpp" or ns.llama_speculative or ns.llama_bench:
        gguf, draft_gguf = registry.resolve_gguf(ns.target), registry.resolve_gguf(ns.draft)
    with _server(ns, out) as srv:
        setup = Setup(
            target,
            draft,
            ns.draft,
            assistant,
            server=srv[0] if srv else None,
            server_http_port=srv[1] if srv else None,
            server_pid=srv[2] if srv else None,
            gguf=gguf,
            draft_gguf=draft_gguf,
            model_rss_bytes=rss,
        )
        try:
            doc = run_bench(ns, setup, prompts)
        finally:
            for px in setup.proxies:
                px.stop()
    if ns.llama_bench and not doc.get("llama_bench"):  # kept from the run resumed, if it had one
        from specsplit.bench.llama_bench import run_llama_bench

        threads = ns.threads or len(os.sched_getaffinity(0))
        models = {ns.target: str(gguf), ns.draft: str(draft_gguf)}
        doc["llama_bench"] = run_llama_bench(ns.llama_bench, models, threads)
    from specsplit.bench.ties import annotate
    from specsplit.faces.api import SpeculativeDecoder

    encoder = SpeculativeDecoder(target, None, warm_up=False)
    refresh(annotate(doc, target, {p.id: encoder.encode_prompt(p.text) for p in prompts}))
    write_outputs(doc, out)
    Path(out, "partial.json").unlink(missing_ok=True)  # the run finished: no checkpoint
    for name, r in doc["summary"]["overall"].items():
        sp = (r["speedup"] or {}).get("median") or 0.0
        tps = (r["tokens_per_s"] or {}).get("median") or 0.0
        eq = r["greedy_equal"] or {"equal": "-", "of": "-"}
        print(
            f"{name:36s} {tps:7.2f} tok/s  speedup {sp:5.2f}x  "
            f"acceptance {r['acceptance_rate'] or 0:.2f}  greedy-equal {eq['equal']}/{eq['of']}"
        )
    print(f"wrote {out}/results.json, results.csv, report.md")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from specsplit.bench.report import load_docs, readme_section, update_readme, write_report

    docs = [refresh(d) for d in load_docs([Path(p) for p in ns.runs])]
    out = Path(ns.out)
    report = write_report(docs, out)
    print(f"wrote {report}")
    if ns.readme:
        readme = Path(ns.readme)
        rel = os.path.relpath(report, readme.parent)
        changed = update_readme(readme, readme_section(docs, rel))
        print(f"{readme}: {'updated' if changed else 'unchanged'}")
    return 0
