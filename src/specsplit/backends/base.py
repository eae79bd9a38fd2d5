"""The backend interface: a causal LM with a KV cache per sequence.

Every backend (transformers/PyTorch, llama.cpp, the NumPy reference) implements this.
A *sequence* is an id (int) naming one KV cache; several sequences live in one backend.
All positions are counted in tokens from the start of the sequence.

Tree forward (for multi-draft verification, SpecInfer): ``forward(seq, tokens, parents)``
appends n tokens whose attention follows a tree: token i attends to the whole cached
prefix, to itself and to its ancestors among the new tokens (``parents[i]`` is the index of
its parent among the new tokens, -1 for a child of the cached prefix). Its position is
``cached_len + depth(i)``. ``parents=None`` means a plain chain (parents[i] = i - 1).
After a tree forward, ``keep(seq, start, indices)`` compacts the cache to the first
``start`` entries followed by the entries of the new tokens at ``indices`` (an accepted
root-to-leaf path, in order).

Batch forward (the batch scheduler's one target pass for many sessions):
``forward_batch([(seq, tokens, parents), ...])`` takes one ``BatchItem`` per distinct sequence,
each a chain (parents None) or a tree exactly as in ``forward``, and returns item b's logits
[n_b, V]: those ``forward(seq, tokens, parents)`` would return (on llama.cpp, up to its
batch-shape drift). If it raises, no sequence has changed.

Batch prefill (several new prompts, or chunks of them, in one pass): ``prefill_batch([(seq,
tokens), ...])`` appends each item's chain and returns the logits [V] after its last token,
those ``prefill(seq, tokens)`` would return; the lm_head runs on those rows only. If it
raises, no sequence has changed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specsplit.errors import ConfigError

BatchItem = tuple[int, Sequence[int], Sequence[int] | None]  # (seq, tokens [n], parents [n])
PrefillItem = tuple[int, Sequence[int]]  # (seq, tokens [n >= 1]): a chain


def check_batch(items: Sequence[BatchItem]) -> list[BatchItem]:
    """forward_batch's items as (seq, tokens, parents) triples; a ConfigError for any other
    shape, a sequence named twice, or parents not one per token."""
    batch: list[BatchItem] = []
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 3:
            raise ConfigError(
                "forward_batch items are (seq, tokens, parents) triples, parents None for a chain"
            )
        seq, tokens, parents = item
        if parents is not None and len(parents) != len(tokens):
            raise ConfigError(f"{len(parents)} parents for {len(tokens)} tokens")
        batch.append((seq, tokens, parents))
    seqs = [seq for seq, _, _ in batch]
    if len(set(seqs)) != len(seqs):
        raise ConfigError("forward_batch: each sequence may appear only once")
    return batch


def check_prefill(items: Sequence[PrefillItem]) -> list[PrefillItem]:
    """prefill_batch's items as (seq, tokens) pairs; a ConfigError for a sequence named twice
    or an item without tokens."""
    if any(not isinstance(it, tuple | list) or len(it) != 2 for it in items):
        raise ConfigError("prefill_batch items are (seq, tokens) pairs")
    batch = [(seq, tokens) for seq, tokens, _ in check_batch([(*it, None) for it in items])]
    if any(not tokens for _, tokens in batch):
        raise ConfigError("prefill_batch: every item needs at least one token")
    return batch


class Tokenizer(ABC):
    """Text <-> token ids for one vocabulary."""

    vocab_size: int  # number of token ids (rows of the logits)
    eos_token_ids: frozenset[int]  # ids that end generation
    bos_token_id: int | None

    @abstractmethod
    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Text -> ids; add_special adds BOS where the model expects one."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; an incomplete UTF-8 character at the end decodes as U+FFFD."""

    @abstractmethod
    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        """Render chat messages with the model's template and a generation prompt;
        None if the model has no chat template."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hash of the vocabulary (tokens and their ids): equal iff ids mean the same text."""


class Backend(ABC):
    """A causal LM with per-sequence KV caches. Logits are float32 or float64 NumPy arrays."""

    name: str  # "torch", "llama.cpp", "numpy"
    tokenizer: Tokenizer
    vocab_size: int  # rows of the logits; may exceed tokenizer.vocab_size (padding)
    n_ctx: int  # the most tokens one sequence may hold
    supports_tree: bool = False  # forward(..., parents) and keep() implemented
    pads_batch: bool = False  # a batched pass costs its items times its longest (padding)
    source_gguf: Path | None = None  # the GGUF the model came from (its tokenizer can travel)

    @abstractmethod
    def new_sequence(self) -> int:
        """Open an empty sequence and return its id."""

    @abstractmethod
    def free_sequence(self, seq: int) -> None:
        """Drop a sequence and its KV cache."""

    @abstractmethod
    def length(self, seq: int) -> int:
        """Number of tokens in the sequence's KV cache."""

    @abstractmethod
    def forward(
        self, seq: int, tokens: Sequence[int], parents: Sequence[int] | None = None
    ) -> np.ndarray:
        """Append tokens [n] to the cache; return logits [n, vocab_size], one row per new token
        (row i is the next-token distribution after token i)."""

    @abstractmethod
    def truncate(self, seq: int, length: int) -> None:
        """Roll the KV cache back to its first ``length`` tokens (called after every rejection)."""

    def keep(self, seq: int, start: int, indices: Sequence[int]) -> None:
        """Keep cache entries [0, start) and the new tokens at start + indices (a tree path)."""
        idx = list(indices)
        if idx == list(range(len(idx))):
            self.truncate(seq, start + len(idx))
            return
        raise NotImplementedError(f"{self.name} backend does not support token trees")

    def prefill(self, seq: int, tokens: Sequence[int], chunk: int = 512) -> np.ndarray:
        """Append a long run of tokens in chunks; return the logits [V] after the last one."""
        last = None
        for i in range(0, len(tokens), chunk):
            last = self.forward(seq, tokens[i : i + chunk])[-1]
        if last is None:
            raise ValueError("prefill needs at least one token")
        return last

    def forward_batch(self, items: Sequence[BatchItem]) -> list[np.ndarray]:
        """Forward distinct sequences' new tokens, each a chain or a tree (see the module
        docstring); logits [n_b, V] per item. Default: one forward after another, undone
        if one fails."""
        batch = check_batch(items)
        starts = [self.length(seq) for seq, _, _ in batch]
        out: list[np.ndarray] = []
        try:
            for seq, tokens, parents in batch:
                out.append(self.forward(seq, tokens, parents))
        except BaseException:
            for (seq, _, _), start in zip(batch[: len(out)], starts, strict=False):
                self.truncate(seq, start)
            raise
        return out

    def prefill_batch(self, items: Sequence[PrefillItem]) -> list[np.ndarray]:
        """Append distinct sequences' chains at once; logits [V] after each item's last token
        (see the module docstring). Default: one prefill after another, undone if one fails."""
        batch = check_prefill(items)
        starts = [self.length(seq) for seq, _ in batch]
        out: list[np.ndarray] = []
        try:
            for seq, tokens in batch:
                out.append(self.prefill(seq, tokens))
        except BaseException:
            for (seq, _), start in zip(batch[: len(out)], starts, strict=False):
                self.truncate(seq, start)
            raise
        return out

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of one sequence holds (0: unknown)."""
        return 0

    def identity(self) -> str:
        """A hash naming the weights and the tokenizer (for handshakes and result files)."""
        return self.tokenizer.fingerprint()

    def close(self) -> None:
        """Release the model (optional)."""
        return None
