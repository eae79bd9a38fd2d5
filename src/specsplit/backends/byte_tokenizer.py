"""A byte-level tokenizer for tiny test models: ids 0..255 are bytes, then BOS and EOS."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from specsplit.backends.base import Tokenizer


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens; vocab_size >= 258 (ids past 257 decode to nothing)."""

    def __init__(self, vocab_size: int = 258) -> None:
        if vocab_size < 258:
            raise ValueError("ByteTokenizer needs vocab_size >= 258")
        self.vocab_size = vocab_size
        self.bos_token_id = 256
        self.eos_token_ids = frozenset({257})

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        return None

    def fingerprint(self) -> str:
        return hashlib.sha256(f"bytes:{self.vocab_size}".encode()).hexdigest()
