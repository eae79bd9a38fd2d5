"""The tokenizer stored in a GGUF file, through transformers, and the shared vocabulary hash."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specsplit.backends.base import Tokenizer
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


def _tokens(reader: Any, path: str | Path) -> list[str]:
    """``tokenizer.ggml.tokens`` of an open GGUF file, in id order."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise ModelError(f"{path}: GGUF file has no tokenizer.ggml.tokens")
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def gguf_vocab_tokens(path: str | Path) -> list[str]:
    """The vocabulary of a GGUF file (``tokenizer.ggml.tokens``), in id order."""
    return _tokens(open_gguf(path), path)


class GGUFTokenizer(Tokenizer):
    """A GGUF file's tokenizer, as the transformers fast tokenizer built from it."""

    def __init__(self, path: str | Path, reader: Any = None) -> None:
        """``reader``: the file already open as a gguf.GGUFReader (saves parsing it twice)."""
        path = Path(path)
        reader = reader if reader is not None else open_gguf(path)
        tokens = _tokens(reader, path)
        self.path = path
        self.hf = _hf_tokenizer(path)
        self.vocab_size = len(tokens)
        self.bos_token_id = self.hf.bos_token_id
        self._fingerprint = vocab_fingerprint(tokens)
        eos_field = reader.fields.get("tokenizer.ggml.eos_token_id")
        eos = {int(eos_field.contents())} if eos_field is not None else set()
        if self.hf.eos_token_id is not None:
            eos.add(int(self.hf.eos_token_id))
        ids = {t: i for i, t in enumerate(tokens)}
        eos |= {ids[t] for t in END_OF_TURN_TOKENS if t in ids}
        self.eos_token_ids = frozenset(eos)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Text -> ids; add_special adds BOS only where the GGUF asks for it."""
        return [int(i) for i in self.hf.encode(text, add_special_tokens=add_special)]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens included; a broken UTF-8 tail becomes U+FFFD."""
        return self.hf.decode(
            [int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        """The GGUF's chat template rendered with a generation prompt; None without one."""
        if not getattr(self.hf, "chat_template", None):
            return None
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def fingerprint(self) -> str:
        """vocab_fingerprint of the GGUF's tokenizer.ggml.tokens."""
        return self._fingerprint


def _hf_tokenizer(path: Path) -> Any:
    """transformers' fast tokenizer converted from the GGUF's tokenizer metadata."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{path.name}: cannot build a tokenizer from the GGUF ({msg})") from None
