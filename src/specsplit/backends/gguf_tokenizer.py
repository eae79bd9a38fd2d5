"""The tokenizer stored in a GGUF file, through transformers, and the shared vocabulary hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from specsplit.backends.hf_tokenizer import HFTokenizer
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


class GGUFTokenizer(HFTokenizer):
    """A GGUF file's tokenizer, as the transformers fast tokenizer built from it."""

    def __init__(self, path: str | Path, reader: Any = None) -> None:
        """``reader``: the file already open as a gguf.GGUFReader (saves parsing it twice)."""
        path = Path(path)
        reader = reader if reader is not None else open_gguf(path)
        tokens = reader_tokens(reader, path)
        eos_field = reader.fields.get("tokenizer.ggml.eos_token_id")
        eos = int(eos_field.contents()) if eos_field is not None else None
        super().__init__(_hf_tokenizer(path), vocab_fingerprint(tokens), eos)
        self.path = path
        self.vocab_size = len(tokens)


def _hf_tokenizer(path: Path) -> Any:
    """transformers' fast tokenizer converted from the GGUF's tokenizer metadata."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{path.name}: cannot build a tokenizer from the GGUF ({msg})") from None
