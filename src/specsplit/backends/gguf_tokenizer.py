"""The tokenizer stored in a GGUF file, through transformers, and the shared vocabulary hash."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specsplit.backends.base import Tokenizer
from specsplit.backends.vocab import (  # noqa: F401  (re-exported)
    END_OF_TURN_TOKENS,
    gguf_tokens,
    open_gguf,
    reader_tokens,
    vocab_fingerprint,
)
from specsplit.errors import ModelError


def gguf_vocab_tokens(path: str | Path) -> list[str]:
    """The vocabulary of a GGUF file (``tokenizer.ggml.tokens``), in id order."""
    return gguf_tokens(path)


class GGUFTokenizer(Tokenizer):
    """A GGUF file's tokenizer, as the transformers fast tokenizer built from it."""

    def __init__(self, path: str | Path, reader: Any = None) -> None:
        """``reader``: the file already open as a gguf.GGUFReader (saves parsing it twice)."""
        path = Path(path)
        reader = reader if reader is not None else open_gguf(path)
        tokens = reader_tokens(reader, path)
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
