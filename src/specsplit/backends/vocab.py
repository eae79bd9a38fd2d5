"""Vocabularies: the GGUF token list, its fingerprint, and the end-of-turn token names.

Every backend names its vocabulary by the same hash, so a target and a drafter (or a
client and a server) can check that token ids mean the same text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specsplit.errors import ModelError

# Tokens that end a turn in common chat formats; like llama.cpp's end-of-generation set,
# they stop generation whenever the vocabulary has them.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
)


def vocab_fingerprint(tokens: Sequence[str]) -> str:
    """sha256 hex digest of the token strings in id order joined by newlines."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def open_gguf(path: str | Path) -> Any:
    """A gguf.GGUFReader over the file, or a one-line ModelError."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise ModelError(f"{path}: not a readable GGUF file ({e})") from None


def reader_tokens(reader: Any, path: str | Path) -> list[str]:
    """``tokenizer.ggml.tokens`` of an open GGUF file, in id order."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise ModelError(f"{path}: GGUF file has no tokenizer.ggml.tokens")
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def gguf_tokens(path: str | Path) -> list[str]:
    """The vocabulary of a GGUF file, in id order."""
    return reader_tokens(open_gguf(path), path)


def gguf_fingerprint(path: str | Path) -> str:
    """The vocabulary fingerprint of a GGUF file's tokenizer."""
    return vocab_fingerprint(gguf_tokens(path))
