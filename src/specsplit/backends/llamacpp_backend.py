"""The llama.cpp backend: llama-cpp-python's low-level API, one llama.cpp sequence per sequence.

All sequences of a backend share one unified KV cell pool (``kv_unified``) of n_ctx + 256
cells. A token tree is decoded in a single ``llama_decode``: each root-to-leaf path gets a
temporary sequence id holding a copy of the cached prefix (cells are shared, not duplicated),
and each tree token enters the batch once, tagged with the ids of every path through it, at
position ``start + depth``, so it attends to the prefix, its ancestors and itself.
``keep()`` adds the accepted path's cells to the sequence and drops the temporary ids.

llama.cpp's logits are not bit-identical across batch shapes: its CPU kernels change with
the number of tokens in a batch and the attention sums over KV cells in pool order (tokens
forwarded after a tree ``keep()`` fill the cells of rejected nodes), so a row can move by
~1 logit between a batched and a one-at-a-time pass; ``logit_drift`` measures it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from specsplit import registry
from specsplit.backends.base import (
    Backend,
    BatchItem,
    PrefillItem,
    Tokenizer,
    check_batch,
    check_prefill,
)
from specsplit.backends.vocab import END_OF_TURN_TOKENS, vocab_fingerprint
from specsplit.errors import ConfigError, ModelError

TREE_SEQS = 32  # temporary llama.cpp sequence ids for the paths of token trees
KV_SLACK = 256  # KV cells beyond n_ctx, for tree tokens and other sequences
N_BATCH = 512  # most tokens in one llama_decode
Entry = tuple[int, int, tuple[int, ...]]  # one batch row: (token, position, sequence ids)

_lib: Any = None
_log_callback: Any = None  # kept alive: llama.cpp holds a pointer to it


def _llama() -> Any:
    """The llama_cpp ctypes bindings, initialised once, with llama.cpp's log silenced."""
    global _lib, _log_callback
    if _lib is None:
        try:
            from llama_cpp import llama_cpp as lib
        except ImportError as e:
            raise ModelError(f"the llama.cpp backend needs llama-cpp-python ({e})") from None
        verbose = os.environ.get("SPECSPLIT_LLAMA_VERBOSE") == "1"

        def log(level: int, text: bytes, user_data: Any) -> None:
            if verbose and text:
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _log_callback = lib.llama_log_callback(log)
        lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
        lib.llama_backend_init()
        _lib = lib
    return _lib


def quantizer_version() -> str:
    """The llama-cpp-python version, which pins the llama.cpp quantizer it vendors."""
    try:
        from llama_cpp import __version__
    except ImportError as e:
        raise ModelError(f"making a requantized model needs llama-cpp-python ({e})") from None
    return __version__


def quantize(src: Path, dst: Path, ftype: str) -> None:
    """Requantize a GGUF into llama.cpp file type ``ftype`` (e.g. "Q4_0"), on all cores."""
    lib = _llama()
    code = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}", None)
    if code is None:
        raise ModelError(f"llama.cpp has no file type {ftype!r}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = code
    params.allow_requantize = True  # (the source is quantized already)
    params.nthread = len(os.sched_getaffinity(0))
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)):
        raise ModelError(f"llama.cpp could not requantize {src} to {ftype}")


def _grow(call: Any, size: int) -> tuple[int, Any]:
    """Call a llama.cpp function that returns -needed when its buffer is too small."""
    n, buf = call(size)
    if n < 0:
        n, buf = call(-n)
    if n < 0:
        raise ModelError("llama.cpp tokenizer buffer error")
    return n, buf


class _Model:
    """An owned llama_model pointer and its vocabulary (freed with the last reference)."""

    def __init__(self, path: Path, gpu_layers: int = 0, vocab_only: bool = False) -> None:
        lib = _llama()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.vocab_only = vocab_only
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelError(f"llama.cpp could not load {path} (not a GGUF model it supports?)")
        self.path = path
        self.vocab = lib.llama_model_get_vocab(self.ptr)

    def __del__(self) -> None:
        if getattr(self, "ptr", None) and _lib is not None:
            _lib.llama_model_free(self.ptr)
            self.ptr = None


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    """A chat template compiled the way transformers compiles it (sandbox, trim, lstrip)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} tag: renders its body
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, **kw: json.dumps(
        x, ensure_ascii=ensure_ascii, **kw
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class LlamaCppTokenizer(Tokenizer):
    """A GGUF vocabulary through llama.cpp's tokenizer."""

    def __init__(self, model: _Model) -> None:
        lib = _llama()
        self._model, self._vocab = model, model.vocab
        self.vocab_size = lib.llama_vocab_n_tokens(self._vocab)
        bos = lib.llama_vocab_bos(self._vocab)
        self.bos_token_id = bos if bos >= 0 else None
        self.eos_token_ids = frozenset(self._eos_ids())
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, name_or_path: str) -> LlamaCppTokenizer:
        """The tokenizer of a GGUF file or model name (vocabulary only, no weights)."""
        return cls(_Model(registry.resolve_gguf(name_or_path), vocab_only=True))

    def _eos_ids(self) -> set[int]:
        """GGUF eos and eot, every id llama.cpp calls end-of-generation, and end-of-turn tokens."""
        v = self._vocab
        ids = {_lib.llama_vocab_eos(v), _lib.llama_vocab_eot(v)}
        ids |= {i for i in range(self.vocab_size) if _lib.llama_vocab_is_eog(v, i)}
        for text in END_OF_TURN_TOKENS:
            got = self.encode(text, add_special=False)
            if len(got) == 1 and self.token_text(got[0]) == text:
                ids.add(got[0])
        return {i for i in ids if 0 <= i < self.vocab_size}

    def token_text(self, token: int) -> str:
        """The vocabulary entry of one id (as in the GGUF token list)."""
        raw = _lib.llama_vocab_get_text(self._vocab, token) or b""
        return raw.decode("utf-8", errors="replace")

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")

        def call(n_max: int) -> tuple[int, Any]:
            buf = (_lib.llama_token * n_max)()
            n = _lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, True)
            return n, buf

        n, buf = _grow(call, len(data) + 8)
        return list(buf[:n])

    def decode(self, ids: Sequence[int]) -> str:
        toks = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab_size for i in toks):
            raise ConfigError(f"token ids must be in [0, {self.vocab_size})")
        arr = (_lib.llama_token * len(toks))(*toks)

        def call(size: int) -> tuple[int, Any]:
            buf = ctypes.create_string_buffer(size)
            return _lib.llama_detokenize(self._vocab, arr, len(toks), buf, size, False, True), buf

        n, buf = _grow(call, 16 * len(toks) + 16)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        """The GGUF's ``tokenizer.chat_template``, or None."""
        raw = _lib.llama_model_chat_template(self._model.ptr, None)
        return raw.decode("utf-8") if raw else None

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        source = self.chat_template()
        if source is None:
            return None
        named = {"bos_token": self.bos_token_id, "eos_token": _lib.llama_vocab_eos(self._vocab)}
        special = {k: self.token_text(i) for k, i in named.items() if i is not None and i >= 0}
        return _compile_template(source).render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **special,
        )

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = vocab_fingerprint(
                [self.token_text(i) for i in range(self.vocab_size)]
            )
        return self._fingerprint


@dataclass
class _Tree:
    """The token tree last forwarded on a sequence, until keep() or truncate()."""

    start: int  # cached length before the tree
    parents: list[int]  # [n]
    node_seq: list[int]  # [n] a temporary sequence id on a path through each node
    temps: list[int]  # all temporary ids the tree holds


def tree_paths(parents: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """Depths [n] and the root-to-leaf paths (lists of node indices) of a token tree."""
    depth: list[int] = []
    has_child = [False] * len(parents)
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ConfigError(f"parents[{i}] = {p}: a parent must be -1 or an earlier index")
        depth.append(depth[p] + 1 if p >= 0 else 0)
        if p >= 0:
            has_child[p] = True
    paths = []
    for leaf in (i for i, c in enumerate(has_child) if not c):
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            node = parents[node]
        paths.append(path[::-1])
    return depth, paths


class LlamaCppBackend(Backend):
    """A GGUF model in one llama.cpp context; sequences are llama.cpp sequence ids."""

    name = "llama.cpp"
    supports_tree = True
    max_tree_paths = TREE_SEQS  # root-to-leaf paths of one tree (temporary sequence ids)

    def __init__(
        self,
        model: _Model,
        n_ctx: int = 4096,
        threads: int | None = None,
        n_seq_max: int = 8,
        seed: int = 0,
        flash_attn: bool | None = None,
    ) -> None:
        lib = _llama()
        threads = threads if threads is not None else len(os.sched_getaffinity(0))
        if threads < 1 or n_ctx < 1 or not 1 <= n_seq_max <= 256 - TREE_SEQS:
            raise ConfigError(
                f"need threads >= 1, n_ctx >= 1, 1 <= n_seq_max <= {256 - TREE_SEQS}; "
                f"got {threads}, {n_ctx}, {n_seq_max}"
            )
        train = lib.llama_model_n_ctx_train(model.ptr)
        self.n_ctx = min(n_ctx, train) if train > 0 else n_ctx  # positions the model knows
        self.seed = seed  # unused: forward passes are deterministic, sampling is in Python
        self._model, self._n_seq = model, n_seq_max
        self.tokenizer = LlamaCppTokenizer(model)
        self.vocab_size = lib.llama_vocab_n_tokens(model.vocab)
        cp = lib.llama_context_default_params()
        cp.n_ctx = self.n_ctx + KV_SLACK  # the cell pool all sequences share
        cp.n_batch = cp.n_ubatch = N_BATCH
        cp.n_seq_max = n_seq_max + TREE_SEQS
        cp.n_outputs_max_per_seq = 0  # = n_outputs_max: every row of a forward has logits
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        if flash_attn is not None:  # None: llama.cpp decides (on for CPU)
            cp.flash_attn_type = int(flash_attn)  # LLAMA_FLASH_ATTN_TYPE_DISABLED / _ENABLED
        cp.no_perf = True
        self._ctx = lib.llama_init_from_model(model.ptr, cp)
        if not self._ctx:
            raise ModelError(f"llama.cpp could not create a context for {model.path}")
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(N_BATCH, 0, n_seq_max + TREE_SEQS)
        self._lens: dict[int, int] = {}
        self._trees: dict[int, _Tree] = {}
        self._free_temps = list(range(n_seq_max + TREE_SEQS - 1, n_seq_max - 1, -1))

    @classmethod
    def load(
        cls,
        name_or_path: str,
        n_ctx: int = 4096,
        threads: int | None = None,
        n_seq_max: int = 8,
        gpu_layers: int = 0,
        seed: int = 0,
        flash_attn: bool | None = None,
    ) -> LlamaCppBackend:
        """A registry model name or .gguf path; gpu_layers -1 offloads every layer."""
        path = registry.resolve_gguf(name_or_path)
        if gpu_layers != 0 and not _llama().llama_supports_gpu_offload():
            raise ConfigError("this llama-cpp-python build has no GPU support; use device cpu")
        backend = cls(
            _Model(path, gpu_layers=gpu_layers), n_ctx, threads, n_seq_max, seed, flash_attn
        )
        backend.source_gguf = path
        return backend

    # ---- sequences -----------------------------------------------------------------------

    def new_sequence(self) -> int:
        if not self._ctx:
            raise ModelError("this llama.cpp backend is closed")
        free = [s for s in range(self._n_seq) if s not in self._lens]
        if not free:
            raise ConfigError(f"all {self._n_seq} sequences are in use (n_seq_max)")
        self._lens[free[0]] = 0
        return free[0]

    def free_sequence(self, seq: int) -> None:
        self._check_seq(seq)
        self._drop_tree(seq)
        _lib.llama_memory_seq_rm(self._mem, seq, -1, -1)
        del self._lens[seq]

    def length(self, seq: int) -> int:
        self._check_seq(seq)
        return self._lens[seq]

    def _check_seq(self, seq: int) -> None:
        if seq not in self._lens:
            raise ConfigError(f"unknown sequence {seq}")

    def _check_tokens(self, seq: int, tokens: Sequence[int]) -> list[int]:
        self._check_seq(seq)
        if seq in self._trees:
            raise ConfigError(f"sequence {seq} holds a token tree: call keep() or truncate() first")
        toks = [int(t) for t in tokens]
        bad = [t for t in toks if not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError(f"token id {bad[0]} out of range [0, {self.vocab_size})")
        if self._lens[seq] + len(toks) > self.n_ctx:
            raise ConfigError(
                f"sequence would hold {self._lens[seq] + len(toks)} tokens, more than n_ctx={self.n_ctx}"
            )
        return toks

    # ---- forward -------------------------------------------------------------------------

    def forward(
        self, seq: int, tokens: Sequence[int], parents: Sequence[int] | None = None
    ) -> np.ndarray:
        n = len(tokens)
        if parents is None and n > N_BATCH:  # a long chain: several decodes
            self._check_tokens(seq, tokens)
            start, out = self._lens[seq], []
            try:
                for i in range(0, n, N_BATCH):
                    out.append(self._run([(seq, tokens[i : i + N_BATCH], None)])[0])
            except Exception:
                self._rollback([(seq, start)])
                raise
            return np.concatenate(out)  # [n, V]
        return self._run([(seq, tokens, parents)])[0]

    def forward_batch(self, items: Sequence[BatchItem]) -> list[np.ndarray]:
        """Items (seq, tokens, parents), distinct sequences, chains or trees, in one decode
        (one decode per item if together they exceed N_BATCH tokens)."""
        batch = check_batch(items)
        if sum(len(tokens) for _, tokens, _ in batch) > N_BATCH:
            return super().forward_batch(batch)
        return self._run(batch)

    def prefill(self, seq: int, tokens: Sequence[int], chunk: int = N_BATCH) -> np.ndarray:
        """Append tokens in chunks with logits for the last one only; return them [V]."""
        toks = self._check_tokens(seq, tokens)
        if not toks:
            raise ValueError("prefill needs at least one token")
        start, chunk = self._lens[seq], max(1, min(chunk, N_BATCH))
        try:
            for i in range(0, len(toks), chunk):
                part = toks[i : i + chunk]
                rows = [(t, start + i + j, (seq,)) for j, t in enumerate(part)]
                last = self._decode(rows, "last" if i + chunk >= len(toks) else "none")
                self._lens[seq] = start + i + len(part)
        except Exception:
            self._rollback([(seq, start)])
            raise
        return last[0]  # [V]

    def prefill_batch(self, items: Sequence[PrefillItem]) -> list[np.ndarray]:
        """Items (seq, tokens), distinct sequences, in one decode with logits at each item's
        last row (one prefill per item if together they exceed N_BATCH tokens); [V] each."""
        batch = check_prefill(items)
        checked = [(seq, self._check_tokens(seq, tokens)) for seq, tokens in batch]
        if len(batch) <= 1 or sum(len(t) for _, t in checked) > N_BATCH:
            return super().prefill_batch(batch)
        starts = [(seq, self._lens[seq]) for seq, _ in checked]
        rows: list[Entry] = []
        last: list[int] = []  # each item's last row
        for seq, toks in checked:
            rows.extend((t, self._lens[seq] + i, (seq,)) for i, t in enumerate(toks))
            last.append(len(rows) - 1)
        try:
            logits = self._decode(rows, last)  # [B, V]
        except Exception:
            self._rollback(starts)
            raise
        for seq, toks in checked:
            self._lens[seq] += len(toks)
        return list(logits)

    def _run(self, items: Sequence[BatchItem]) -> list[np.ndarray]:
        """Forward several sequences' new tokens (chains or trees) in one llama_decode."""
        checked = [(s, self._check_tokens(s, t), p) for s, t, p in items]
        starts = [(s, self._lens[s]) for s, _, _ in checked]
        rows: list[Entry] = []
        trees: list[_Tree | None] = []
        try:
            for seq, toks, parents in checked:
                trees.append(self._layout(seq, toks, parents, rows))
            logits = (
                self._decode(rows, "all") if rows else np.zeros((0, self.vocab_size), np.float32)
            )
        except Exception:
            for tree in trees:
                if tree is not None:
                    self._release(tree.temps)
            self._rollback(starts)
            raise
        out, at = [], 0
        for (seq, toks, _), tree in zip(checked, trees, strict=True):
            out.append(logits[at : at + len(toks)])  # [n, V]
            at += len(toks)
            self._lens[seq] += len(toks)
            if tree is not None:
                self._trees[seq] = tree
        return out

    def _layout(
        self, seq: int, toks: list[int], parents: Sequence[int] | None, rows: list[Entry]
    ) -> _Tree | None:
        """Append one item's batch rows; for a tree, copy the prefix to one id per path."""
        start = self._lens[seq]
        if parents is not None and len(parents) != len(toks):
            raise ConfigError(f"{len(parents)} parents for {len(toks)} tokens")
        if parents is None or list(parents) == list(range(-1, len(toks) - 1)):
            rows.extend((t, start + i, (seq,)) for i, t in enumerate(toks))
            return None
        depth, paths = tree_paths([int(p) for p in parents])
        if len(paths) > len(self._free_temps):
            raise ConfigError(f"a token tree with {len(paths)} leaves; at most {TREE_SEQS} at once")
        temps = [self._free_temps.pop() for _ in paths]
        on: list[list[int]] = [[] for _ in toks]
        for tid, path in zip(temps, paths, strict=True):
            _lib.llama_memory_seq_cp(self._mem, seq, tid, -1, -1)
            for node in path:
                on[node].append(tid)
        rows.extend((t, start + depth[i], tuple(on[i])) for i, t in enumerate(toks))
        return _Tree(start, [int(p) for p in parents], [ids[0] for ids in on], temps)

    def _decode(self, rows: list[Entry], logits: str | Sequence[int]) -> np.ndarray:
        """One llama_decode; logits "all" [n, V], "last" [1, V], "none" [0, V], or at the
        row indices given (ascending) [k, V]."""
        b, n = self._batch, len(rows)
        if n > N_BATCH:
            raise ConfigError(f"at most {N_BATCH} tokens in one token tree or batch, got {n}")
        b.n_tokens = n
        if isinstance(logits, str):
            want = {"all": set(range(n)), "last": {n - 1}, "none": set()}[logits]
        else:
            want = set(logits)
        for i, (tok, pos, seqs) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, len(seqs)
            ids = b.seq_id[i]
            for j, s in enumerate(seqs):
                ids[j] = s
            b.logits[i] = i in want
        rc = _lib.llama_decode(self._ctx, b)
        if rc == 1:
            raise ConfigError(
                f"llama.cpp KV cache full ({_lib.llama_n_ctx(self._ctx)} cells shared by all "
                "sequences): free sequences or load with a larger n_ctx"
            )
        if rc != 0:
            raise ModelError(f"llama_decode failed with code {rc} on a batch of {n} tokens")
        if not want:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        n_out = len(want)  # rows in batch order
        ptr = (
            _lib.llama_get_logits(self._ctx)
            if n_out > 1
            else _lib.llama_get_logits_ith(self._ctx, max(want))
        )
        if not ptr:
            raise ModelError("llama.cpp returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.vocab_size)).copy()  # [n_out, V]

    def _rollback(self, starts: Sequence[tuple[int, int]]) -> None:
        """Undo a failed forward: each sequence back to its earlier length."""
        for seq, start in starts:
            _lib.llama_memory_seq_rm(self._mem, seq, start, -1)
            self._lens[seq] = start

    # ---- cache editing -------------------------------------------------------------------

    def truncate(self, seq: int, length: int) -> None:
        self._check_seq(seq)
        if not 0 <= length <= self._lens[seq]:
            raise ConfigError(f"cannot truncate a {self._lens[seq]}-token sequence to {length}")
        tree = self._trees.get(seq)
        if tree is not None and length > tree.start:  # a chain prefix of the tree's tokens
            self.keep(seq, tree.start, range(length - tree.start))
            return
        self._drop_tree(seq)
        if not _lib.llama_memory_seq_rm(self._mem, seq, length, -1):
            raise ModelError("this model's llama.cpp memory cannot roll back (recurrent?)")
        self._lens[seq] = length

    def keep(self, seq: int, start: int, indices: Sequence[int]) -> None:
        self._check_seq(seq)
        idx = [int(i) for i in indices]
        tree = self._trees.get(seq)
        if tree is None or not idx:
            if idx != list(range(len(idx))):
                raise ConfigError(f"keep({start}, {idx}): no token tree on sequence {seq}")
            self.truncate(seq, start + len(idx))
            return
        expect = [-1, *idx[:-1]]
        if (
            start != tree.start
            or [tree.parents[i] if 0 <= i < len(tree.parents) else None for i in idx] != expect
        ):
            raise ConfigError(
                f"keep({start}, {idx}): not a root path of the token tree at {tree.start}"
            )
        _lib.llama_memory_seq_cp(self._mem, tree.node_seq[idx[-1]], seq, start, start + len(idx))
        self._drop_tree(seq)
        self._lens[seq] = start + len(idx)

    def _drop_tree(self, seq: int) -> None:
        """Remove a sequence's pending tree: its temporary ids and their cells."""
        tree = self._trees.pop(seq, None)
        if tree is not None:
            self._release(tree.temps)

    def _release(self, temps: list[int]) -> None:
        for tid in temps:
            _lib.llama_memory_seq_rm(self._mem, tid, -1, -1)
        self._free_temps.extend(temps)

    # ---- misc ----------------------------------------------------------------------------

    def identity(self) -> str:
        """sha256 of the GGUF file's key and the tokenizer's fingerprint."""
        key = registry.gguf_key(self._model.path) + self.tokenizer.fingerprint()
        return hashlib.sha256(key.encode()).hexdigest()

    def kv_bytes_per_token(self) -> int:
        m = self._model.ptr
        head_dim = _lib.llama_model_n_embd(m) // _lib.llama_model_n_head(m)
        return 2 * _lib.llama_model_n_layer(m) * _lib.llama_model_n_head_kv(m) * head_dim * 2  # f16

    def close(self) -> None:
        """Free the context and the batch; the weights go with the last reference to them."""
        if getattr(self, "_ctx", None):
            _lib.llama_batch_free(self._batch)
            _lib.llama_free(self._ctx)
            self._ctx = None
        self._lens, self._trees = {}, {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def logit_drift(backend: Backend, tokens: Sequence[int]) -> float:
    """Largest |logit| difference between one forward of all tokens and one at a time."""
    seq = backend.new_sequence()
    try:
        together = backend.forward(seq, tokens)  # [n, V]
        backend.truncate(seq, 0)
        apart = np.concatenate([backend.forward(seq, [t]) for t in tokens])  # [n, V]
    finally:
        backend.free_sequence(seq)
    return float(np.abs(together.astype(np.float64) - apart).max())
