"""A transformers tokenizer behind the specsplit Tokenizer interface, and vocabulary hashes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from specsplit.backends.base import Tokenizer
from specsplit.backends.vocab import (  # noqa: F401  (re-exported)
    END_OF_TURN_TOKENS,
    gguf_fingerprint,
    gguf_tokens,
    vocab_fingerprint,
)


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
