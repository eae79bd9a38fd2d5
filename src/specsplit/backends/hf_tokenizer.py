"""A transformers tokenizer behind the specsplit Tokenizer interface, and vocabulary hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
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
    """sha256 of the token strings in id order joined by newlines (same for every backend)."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def gguf_tokens(path: str | Path) -> list[str]:
    """The vocabulary of a GGUF file (``tokenizer.ggml.tokens``), in id order."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    except KeyError:
        raise ModelError(f"{path}: GGUF file has no tokenizer.ggml.tokens") from None
    except Exception as e:
        raise ModelError(f"{path}: not a readable GGUF file ({e})") from None
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def gguf_fingerprint(path: str | Path) -> str:
    """The vocabulary fingerprint of a GGUF file's tokenizer."""
    return vocab_fingerprint(gguf_tokens(path))


def _as_ids(value: int | Iterable[int] | None) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


class HFTokenizer(Tokenizer):
    """A transformers tokenizer (fast or slow) seen through the specsplit Tokenizer interface."""

    def __init__(
        self,
        tokenizer: Any,
        fingerprint: str | None = None,
        generation_eos: int | Iterable[int] | None = None,
    ) -> None:
        """``fingerprint``: the GGUF vocabulary hash where the model came from a GGUF;
        ``generation_eos``: the eos_token_id of the model's generation config."""
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        self.bos_token_id = tokenizer.bos_token_id
        self._fingerprint = fingerprint
        vocab = tokenizer.get_vocab()
        eos = _as_ids(tokenizer.eos_token_id) | _as_ids(generation_eos)
        eos |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        self.eos_token_ids = frozenset(eos)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(
            [int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        if not getattr(self.hf, "chat_template", None):
            return None
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            tokens = self.hf.convert_ids_to_tokens(list(range(len(self.hf))))
            self._fingerprint = vocab_fingerprint([t if t is not None else "" for t in tokens])
        return self._fingerprint
