"""Generation settings declared once, as typed fields with descriptions and bounds.

The CLI flags are built from these fields; the Python API takes the same names.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from specsplit.backends.load import BACKENDS, DTYPES
from specsplit.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def dtype_field() -> Any:
    """The --dtype setting of a torch target (generate and serve)."""
    return _f(
        None,
        "number type of a torch target: float32 (default), bfloat16, float16, or auto: "
        "bfloat16 on CUDA and on CPUs with AMX (there a pass over 8 tokens costs what one "
        "token's does), else float32",
        choices=DTYPES,
    )


@dataclass
class GenerateSettings:
    """Everything `specsplit generate` accepts besides the prompt."""

    target: str | None = _f(
        None,
        "target model: a name from `specsplit models list`, a .gguf path, a folder or a hub id "
        "(default qwen2.5-coder-1.5b; with --server: the server's, and this only checks it)",
    )
    draft: list[str] = _f(
        None,
        "drafter: a model name/path, ngram, or none (target alone); repeat for several drafters",
        action="append",
    )
    target_backend: str = _f("torch", "backend of the target", choices=BACKENDS)
    draft_backend: str = _f("llama.cpp", "backend of draft models", choices=BACKENDS)
    device: str = _f("cpu", "device of the target: cpu, cuda, cuda:N")
    dtype: str | None = dtype_field()
    draft_device: str = _f("cpu", "device of draft models: cpu, cuda, cuda:N")
    target_threads: int | None = _f(
        None, "CPU threads for the target (default: all cores)", type=int
    )
    draft_threads: int | None = _f(
        None, "CPU threads for draft models (default: all cores)", type=int
    )
    max_new_tokens: int = _f(128, "most new tokens to generate (>= 1)", type=int)
    temperature: float = _f(0.0, "0 = greedy; > 0 samples", type=float)
    top_k: int = _f(0, "keep the k most likely tokens (0 = off)", type=int)
    top_p: float = _f(1.0, "nucleus mass in (0, 1] (1 = off)", type=float)
    min_p: float = _f(0.0, "drop tokens below min_p x the top probability, [0, 1)", type=float)
    seed: int | None = _f(
        None, "random seed (sampling); printed in the statistics for replay", type=int
    )
    k: str = _f(
        "auto", "draft length per round: a number 0..64, or auto (chosen from measured costs)"
    )
    draft_tree: str = _f(
        "off",
        "one drafter's token tree per round: off (a chain of --k tokens), auto (width and "
        "depth from measured costs) or WIDTHxDEPTH (draws per level x levels, fixed: replays)",
    )
    stop: list[str] = _f(None, "stop string (repeatable); the text ends before it", action="append")
    n_ctx: int = _f(4096, "context length for the target and drafters", type=int)
    no_chat: bool = _f(
        False, "send the prompt as raw text, without the model's chat template", action="store_true"
    )
    server: list[str] = _f(
        None,
        "HOST:PORT of a specsplit server: draft here, verify there (repeat: fallbacks in order)",
        action="append",
    )
    auth_token_file: str | None = _f(None, "file with the bearer token the server wants")
    tls_ca: str | None = _f(None, "PEM root certificate: talk TLS to the server")
    server_draft: bool = _f(
        False, "with --server and --draft none: let the server speculate alone", action="store_true"
    )
    json: bool = _f(
        False,
        "print one JSON object with the text and statistics as the last line",
        action="store_true",
    )


def add_arguments(parser: argparse.ArgumentParser, cls: type = GenerateSettings) -> None:
    """One flag per field: --field-name, with the field's help, type, bounds and default."""
    for f in fields(cls):
        meta = dict(f.metadata)
        kw: dict[str, Any] = {"help": meta.pop("help"), **meta}
        if f.default is not MISSING and kw.get("action") != "store_true":
            kw["default"] = f.default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def from_namespace(ns: argparse.Namespace, cls: type = GenerateSettings) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


def parse_k(k: str) -> int | None:
    """--k: a number 0..64, or auto (None)."""
    if k == "auto":
        return None
    try:
        value = int(k)
    except ValueError:
        raise ConfigError(f"--k must be a number 0..64 or auto, got {k!r}") from None
    if not 0 <= value <= 64:
        raise ConfigError(f"--k must be in 0..64, got {value}")
    return value
