"""A model's tokenizer as one small file, for a client that has no model of its own.

The file is a GGUF holding the model's metadata (vocabulary, merges, special tokens, chat
template, hyper-parameters) and no tensors: llama.cpp loads it vocabulary-only in well under
a second. A server makes it from its target's GGUF and sends it (gzipped, about 1.7 MB for
Qwen's 151,936 tokens); the client keeps it under ``$SPECSPLIT_CACHE/vocab/<fingerprint>``,
so the next run needs no transfer.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path

from specsplit import registry
from specsplit.backends.base import Tokenizer
from specsplit.errors import ModelError


def vocab_path(fingerprint: str) -> Path:
    """Where the vocabulary file of a fingerprint is kept."""
    if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
        raise ModelError(f"not a vocabulary fingerprint: {fingerprint[:20]!r}")
    return registry.cache_dir() / "vocab" / fingerprint / "vocab.gguf"


def write_vocab_only(src: Path, dst: Path) -> None:
    """Copy every metadata field of the GGUF ``src`` into a GGUF without tensors at ``dst``."""
    from gguf import GGUFValueType, GGUFWriter

    from specsplit.backends.vocab import open_gguf

    reader = open_gguf(src)
    arch = reader.fields["general.architecture"].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".tmp")
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, arch)
        for name, f in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            kind = f.types[0]
            sub = f.types[-1] if kind == GGUFValueType.ARRAY else None
            writer.add_key_value(name, f.contents(), kind, sub_type=sub)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)


def vocab_blob(src: Path, fingerprint: str) -> bytes:
    """The gzipped vocabulary-only GGUF of the model at ``src`` (made once, then cached)."""
    path = vocab_path(fingerprint)
    if not path.exists():
        write_vocab_only(src, path)
    return gzip.compress(path.read_bytes(), compresslevel=6)


def save_vocab_blob(blob: bytes, fingerprint: str) -> Path:
    """Unpack a vocabulary blob from a server into the cache; returns the file's path."""
    path = vocab_path(fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = gzip.decompress(blob)
    except (OSError, EOFError) as e:
        raise ModelError(f"the server sent a damaged vocabulary ({e})") from None
    if not data.startswith(b"GGUF"):
        raise ModelError("the server sent a vocabulary that is not a GGUF file")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def load_vocab(fingerprint: str) -> Tokenizer | None:
    """The cached tokenizer of a fingerprint (checked against it), or None if not cached."""
    path = vocab_path(fingerprint)
    if not path.exists():
        return None
    from specsplit.backends.llamacpp_backend import LlamaCppTokenizer

    tok = LlamaCppTokenizer.load(str(path))
    if tok.fingerprint() != fingerprint:
        path.unlink(missing_ok=True)
        raise ModelError(f"the vocabulary file for {fingerprint[:12]} has another vocabulary")
    return tok
