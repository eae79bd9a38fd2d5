"""The transformers / PyTorch backend: per-sequence DynamicCaches, token trees, batching.

Tree forwards and batches pass a 4D additive mask [B, 1, n, kv_len] (0 = may attend,
dtype-min = may not) as ``attention_mask``; transformers 5 hands such a mask to the
attention kernels unchanged. Models run with "sdpa" attention, Gemma 2 with an exact eager
attention (see torch_attention.py).

Sliding-window layers (Mistral, the alternating layers of Gemma 2 and 3) run only where the
window covers the backend's whole context (n_ctx <= window): there a window changes nothing,
so every layer keeps a plain full cache and the masks are the full-attention ones. A narrower
window is refused at construction.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from specsplit import registry
from specsplit.backends.base import (
    Backend,
    BatchItem,
    PrefillItem,
    Tokenizer,
    check_batch,
    check_prefill,
)
from specsplit.backends.hf_tokenizer import HFTokenizer, gguf_fingerprint
from specsplit.backends.torch_attention import use_exact_attention
from specsplit.backends.torch_packed import can_pack, pack_linears
from specsplit.backends.tree import tree_layout
from specsplit.errors import ConfigError, ModelError

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
META_FILE = "specsplit.json"  # written last into a converted-model folder


def auto_dtype(device: str = "cpu") -> str:
    """bfloat16 where it is fast (CUDA; a CPU with AMX tiles, where a pass over 8 tokens
    costs what one over 1 token does), else float32."""
    if device.startswith("cuda") or torch.cpu._is_amx_tile_supported():
        return "bfloat16"
    return "float32"


def attention_mask(
    lens: Sequence[int], ancs: Sequence[np.ndarray], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive mask [B, 1, N, L + N] for B sequences with cached lengths ``lens`` (cache
    padded on the right to L = max lens) and new tokens padded on the right to N."""
    l_max, n_max = max(lens), max(a.shape[0] for a in ancs)
    allowed = np.zeros((len(lens), n_max, l_max + n_max), dtype=bool)
    diag = np.arange(n_max)
    allowed[:, diag, l_max + diag] = True  # every row sees itself (padding rows too: no NaN)
    for b, (length, anc) in enumerate(zip(lens, ancs, strict=True)):
        n = anc.shape[0]
        allowed[b, :, :length] = True
        allowed[b, :n, l_max : l_max + n] = anc
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(torch.from_numpy(~allowed), torch.finfo(dtype).min)
    return mask.unsqueeze(1).to(device)


class TorchBackend(Backend):
    """A transformers causal LM with one DynamicCache per sequence (full-attention layers, or
    sliding windows that span n_ctx)."""

    name = "torch"
    supports_tree = True
    pads_batch = True  # new tokens are padded on the right to the longest item

    def __init__(
        self, model: Any, tokenizer: Tokenizer, device: str = "cpu", n_ctx: int | None = None
    ) -> None:
        self.device = _check_device(device)
        self.model = model.to(self.device).eval()
        self.config = self.model.config.get_text_config(decoder=True)
        self.tokenizer = tokenizer
        self.vocab_size = int(self.config.vocab_size)
        if tokenizer.vocab_size > self.vocab_size:
            raise ModelError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only {self.vocab_size}"
            )
        self.n_ctx = int(n_ctx or self.config.max_position_embeddings)
        if self.n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1, got {self.n_ctx}")
        self._n_layers = _full_attention_layers(self.config, self.n_ctx)
        use_exact_attention(self.model)
        self.origin = "memory"  # where the weights came from: memory, gguf, cache, folder, hub
        self._caches: dict[int, Any] = {}
        self._lens: dict[int, int] = {}
        self._next_seq = 0
        self._identity: str | None = None

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        ref: str,
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
        n_ctx: int | None = None,
    ) -> TorchBackend:
        """A model by registry name, .gguf path, local transformers folder or hub id."""
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        if dtype == "auto":
            dtype = auto_dtype(device)
        tdtype = DTYPES.get(dtype)
        if tdtype is None:
            raise ConfigError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
        _check_device(device)
        if ref in registry.MODELS or ref.endswith(".gguf"):
            gguf = registry.resolve_gguf(ref)
            model, tok, origin = _load_gguf(gguf, tdtype)
        elif Path(ref).expanduser().is_dir():
            with _no_progress_bars():  # a local load takes seconds, like a cached one
                model, tok = _load_transformers(str(Path(ref).expanduser()), tdtype)
            origin = "folder"
        elif ref.count("/") == 1 and not Path(ref).exists():
            model, tok, origin = (*_load_hub(ref, tdtype), "hub")
        else:
            registry.spec(ref)  # raises the one-line unknown-model error
            raise AssertionError("unreachable")
        backend = cls(model, tok, device=device, n_ctx=n_ctx)
        backend.origin = origin
        if can_pack(backend.model, backend.device):  # (a model it loaded itself: its own)
            backend.identity()  # of the weights as loaded: packed ones are opaque
            pack_linears(backend.model)
        if ref in registry.MODELS or ref.endswith(".gguf"):
            backend.source_gguf = gguf
        return backend

    # ---- sequences -----------------------------------------------------------------------

    def new_sequence(self) -> int:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        self._caches[seq] = self._new_cache()
        self._lens[seq] = 0
        return seq

    def _new_cache(self) -> Any:
        """A DynamicCache with a full-attention layer per model layer (sliding windows were
        checked to cover n_ctx, so a full cache is exact for them too)."""
        cache = DynamicCache()
        cache.layers = [DynamicLayer() for _ in range(self._n_layers)]
        return cache

    def free_sequence(self, seq: int) -> None:
        self._check_seq(seq)
        del self._caches[seq], self._lens[seq]

    def length(self, seq: int) -> int:
        self._check_seq(seq)
        return self._lens[seq]

    def _check_seq(self, seq: int) -> None:
        if seq not in self._caches:
            raise ConfigError(f"unknown sequence {seq}")

    def _check_tokens(self, seq: int, tokens: Sequence[int]) -> list[int]:
        self._check_seq(seq)
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

    @torch.inference_mode()
    def forward(
        self, seq: int, tokens: Sequence[int], parents: Sequence[int] | None = None
    ) -> np.ndarray:
        toks = self._check_tokens(seq, tokens)
        n, start = len(toks), self._lens[seq]
        if parents is not None and len(parents) != n:
            raise ConfigError(f"{len(parents)} parents for {n} tokens")
        if n == 0:
            return np.zeros((0, self.vocab_size), dtype=self._np_dtype())
        ids = torch.tensor([toks], device=self.device)  # [1, n]
        kwargs: dict[str, Any] = {}
        if parents is None or list(parents) == list(range(-1, n - 1)):
            positions = torch.arange(start, start + n, device=self.device)[None]  # [1, n]
        else:  # a tree: custom mask, positions by depth
            depth, anc = tree_layout(list(parents))
            positions = torch.from_numpy(start + depth)[None].to(self.device)  # [1, n]
            kwargs["attention_mask"] = attention_mask([start], [anc], self.model.dtype, self.device)
        try:
            out = self.model(
                input_ids=ids, position_ids=positions, past_key_values=self._caches[seq], **kwargs
            )
        except Exception:
            self._crop(seq, start)  # a failed call may have grown some layers
            raise
        self._lens[seq] = start + n
        return self._to_numpy(out.logits[0])  # [n, V]

    @torch.inference_mode()
    def prefill(self, seq: int, tokens: Sequence[int], chunk: int = 512) -> np.ndarray:
        """Append tokens in chunks, computing logits for the last position only [V]."""
        toks = self._check_tokens(seq, tokens)
        if not toks:
            raise ValueError("prefill needs at least one token")
        start = self._lens[seq]
        try:
            for i in range(0, len(toks), chunk):
                part = toks[i : i + chunk]
                at = self._lens[seq]
                out = self.model(
                    input_ids=torch.tensor([part], device=self.device),  # [1, n]
                    position_ids=torch.arange(at, at + len(part), device=self.device)[None],
                    past_key_values=self._caches[seq],
                    logits_to_keep=1,  # the lm_head on the last position only
                )
                self._lens[seq] = at + len(part)
        except Exception:
            self._crop(seq, start)
            raise
        return self._to_numpy(out.logits[0, -1])  # [V]

    @torch.inference_mode()
    def forward_batch(self, items: Sequence[BatchItem]) -> list[np.ndarray]:
        """Items (seq, tokens, parents), distinct sequences, chains or trees: one batched
        forward over all that have tokens; returns logits [n_b, V] per item."""
        batch = check_batch(items)
        toks = [self._check_tokens(seq, tokens) for seq, tokens, _ in batch]
        live = [b for b, t in enumerate(toks) if t]  # items with tokens
        if len(live) <= 1:
            return super().forward_batch(batch)  # one forward each
        out = [np.zeros((0, self.vocab_size), dtype=self._np_dtype()) for _ in batch]
        logits = self._forward_padded([(batch[b][0], toks[b], batch[b][2]) for b in live])
        for b, lg in zip(live, logits, strict=True):
            out[b] = lg
        return out

    @torch.inference_mode()
    def prefill_batch(self, items: Sequence[PrefillItem]) -> list[np.ndarray]:
        """Items (seq, tokens), distinct sequences: one batched forward of their chains, the
        lm_head on each item's last position only; logits [V] per item."""
        batch = check_prefill(items)
        if len(batch) <= 1:
            return super().prefill_batch(batch)
        toks = [self._check_tokens(seq, tokens) for seq, tokens in batch]
        logits = self._forward_padded(
            [(seq, t, None) for (seq, _), t in zip(batch, toks, strict=True)], last_only=True
        )
        return [lg[-1] for lg in logits]

    def _forward_padded(
        self, items: Sequence[tuple[int, list[int], Sequence[int] | None]], last_only: bool = False
    ) -> list[np.ndarray]:
        """One forward of B >= 2 sequences, new tokens padded on the right to N; caches are
        stacked into one batch cache and split back after the pass. ``last_only``: logits
        [1, V] after each item's last token (the lm_head on those rows alone), else [n_b, V]."""
        seqs = [seq for seq, _, _ in items]
        toks = [t for _, t, _ in items]
        layouts = [
            tree_layout(list(p) if p is not None else list(range(-1, len(t) - 1)))
            for _, t, p in items
        ]  # depths [n_b], ancestors [n_b, n_b]
        lens = [self._lens[s] for s in seqs]
        n_max = max(len(t) for t in toks)
        ids = torch.tensor([t + [0] * (n_max - len(t)) for t in toks], device=self.device)
        pos = np.stack([ln + np.pad(d, (0, n_max - len(d))) for ln, (d, _) in zip(lens, layouts)])
        mask = attention_mask(lens, [a for _, a in layouts], self.model.dtype, self.device)
        kwargs: dict[str, Any] = {}
        if last_only:  # the distinct last positions [k]; logits come out [B, k, V]
            keep = sorted({len(t) - 1 for t in toks})
            kwargs["logits_to_keep"] = torch.tensor(keep, device=self.device)
        cache = self._stack_caches(seqs, max(lens))
        out = self.model(
            input_ids=ids,  # [B, N]
            position_ids=torch.from_numpy(pos).to(self.device),  # [B, N]
            attention_mask=mask,  # [B, 1, N, L + N]
            past_key_values=cache,
            **kwargs,
        )
        self._unstack_caches(seqs, cache, max(lens), [len(t) for t in toks])
        if last_only:
            rows = torch.tensor([keep.index(len(t) - 1) for t in toks], device=self.device)
            last = self._to_numpy(out.logits[torch.arange(len(toks)), rows])  # [B, V]
            return [last[b : b + 1] for b in range(len(toks))]  # [1, V] each
        logits = self._to_numpy(out.logits)  # [B, N, V]
        return [logits[b, : len(t)] for b, t in enumerate(toks)]

    def _stack_caches(self, seqs: Sequence[int], l_max: int) -> Any:
        """One batch cache over the sequences' own caches: each layer pads and stacks them
        only when the model reaches it (``_StackedLayer``)."""
        batch = DynamicCache()
        lens = [self._lens[s] for s in seqs]
        batch.layers = [
            _StackedLayer([self._caches[s].layers[li] for s in seqs], lens, l_max)
            for li in range(self._n_layers)
        ]
        return batch

    def _unstack_caches(self, seqs: Sequence[int], batch: Any, l_max: int, ns: list[int]) -> None:
        """Append each sequence's new entries (the pass's first n_b of N) to its own cache."""
        for li, layer in enumerate(batch.layers):
            keys, values = layer.new  # [B, H, N, D]
            for b, (s, n) in enumerate(zip(seqs, ns, strict=True)):
                self._caches[s].layers[li].update(keys[b : b + 1, :, :n], values[b : b + 1, :, :n])
            layer.new = None
        for s, n in zip(seqs, ns, strict=True):
            self._lens[s] += n

    # ---- cache editing -------------------------------------------------------------------

    @torch.inference_mode()
    def truncate(self, seq: int, length: int) -> None:
        self._check_seq(seq)
        if not 0 <= length <= self._lens[seq]:
            raise ConfigError(f"cannot truncate a {self._lens[seq]}-token sequence to {length}")
        self._crop(seq, length)

    def _crop(self, seq: int, length: int) -> None:
        for layer in self._caches[seq].layers:
            if layer.is_initialized:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
        self._lens[seq] = length

    @torch.inference_mode()
    def keep(self, seq: int, start: int, indices: Sequence[int]) -> None:
        self._check_seq(seq)
        idx = [int(i) for i in indices]
        n_new = self._lens[seq] - start
        if not 0 <= start <= self._lens[seq] or any(not 0 <= i < n_new for i in idx):
            raise ConfigError(f"keep({start}, {idx}) out of range for length {self._lens[seq]}")
        if idx == list(range(len(idx))):
            self._crop(seq, start + len(idx))
            return
        rows = torch.tensor(idx, device=self.device) + start  # [k]
        for layer in self._caches[seq].layers:
            if layer.is_initialized:  # [1, H, L, D] -> [1, H, start + k, D]
                layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys[:, :, rows]], 2)
                layer.values = torch.cat(
                    [layer.values[..., :start, :], layer.values[:, :, rows]], 2
                )
        self._lens[seq] = start + len(idx)

    # ---- misc ----------------------------------------------------------------------------

    def identity(self) -> str:
        """sha256 over the tokenizer's fingerprint and every weight tensor's name, shape,
        dtype and a strided sample of its values (cheap, and changes with any real edit)."""
        if self._identity is None:
            h = hashlib.sha256(self.tokenizer.fingerprint().encode())
            with torch.inference_mode():
                for name, t in self.model.state_dict().items():
                    flat = t.detach().reshape(-1)
                    sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
                    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                    h.update(sample.tobytes())
            self._identity = h.hexdigest()
        return self._identity

    def kv_bytes_per_token(self) -> int:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        elem = torch.finfo(self.model.dtype).bits // 8
        return 2 * c.num_hidden_layers * kv_heads * head_dim * elem  # keys and values

    def _np_dtype(self) -> type:
        return np.float64 if self.model.dtype == torch.float64 else np.float32

    def _to_numpy(self, logits: torch.Tensor) -> np.ndarray:
        if logits.dtype != torch.float64:
            logits = logits.float()
        return logits.cpu().numpy()

    def close(self) -> None:
        self._caches.clear()
        self._lens.clear()
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---- loading helpers ---------------------------------------------------------------------


def _full_attention_layers(config: Any, n_ctx: int) -> int:
    """The number of attention layers; a ConfigError if a sliding (or chunked) window is
    narrower than n_ctx, a ModelError for layers that are not attention with a KV cache."""
    try:
        layers = DynamicCache(config=config).layers  # the cache transformers would build
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{config.model_type}: cannot lay out its KV cache ({msg})") from None
    windows = []
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        if kind == "DynamicSlidingWindowLayer":
            windows.append(int(layer.sliding_window))
        elif kind != "DynamicLayer":
            raise ModelError(
                f"{config.model_type}: layer {i} keeps a {kind} cache; the torch backend runs "
                "full-attention and sliding-window layers only"
            )
    if windows and min(windows) < n_ctx:
        raise ConfigError(
            f"{config.model_type}: its attention window ({min(windows)} tokens) is narrower than "
            f"n_ctx={n_ctx}, and the torch backend runs a window only where it spans the whole "
            f"context; pass n_ctx <= {min(windows)}"
        )
    return len(layers)


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def _tokenizer(source: str, model: Any, fingerprint: str | None = None, **kw: Any) -> HFTokenizer:
    from transformers import AutoTokenizer

    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    hf_tok = AutoTokenizer.from_pretrained(source, **kw)
    return HFTokenizer(hf_tok, fingerprint=fingerprint, generation_eos=eos)


def _load_transformers(
    source: str, dtype: torch.dtype, fingerprint: str | None = None, **kw: Any
) -> tuple[Any, HFTokenizer]:
    """Model and tokenizer from a transformers folder or hub id (kw: from_pretrained's)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, **kw
    )  # attention: see __init__
    return model, _tokenizer(source, model, fingerprint, **kw)


def _load_hub(hub_id: str, dtype: torch.dtype) -> tuple[Any, HFTokenizer]:
    """From the hub, or only from the local Hugging Face cache where the hub is unreachable
    (a quick probe, instead of huggingface_hub's retries with backoff)."""
    local_only = registry.hub_offline() or not registry.hub_reachable()
    try:
        return _load_transformers(hub_id, dtype, local_files_only=local_only)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"cannot load {hub_id!r} from the Hugging Face hub ({msg[:120]}); "
            f"pass a model name, a .gguf path or a local folder instead"
        ) from None


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, HFTokenizer, str]:
    """A GGUF model, de-quantized once and then cached as safetensors."""
    folder = registry.cache_dir() / "converted" / registry.gguf_key(path)
    meta = folder / META_FILE
    if meta.exists():
        fingerprint = json.loads(meta.read_text())["fingerprint"]
        with _no_progress_bars():
            return (*_load_transformers(str(folder), dtype, fingerprint=fingerprint), "cache")
    model = _convert_gguf(path, folder)  # float32
    fingerprint = json.loads(meta.read_text())["fingerprint"]
    return model.to(dtype), _tokenizer(str(folder), model, fingerprint), "gguf"


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' per-load progress bars of local folders (kept for the slow GGUF
    conversion and for hub downloads)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _convert_gguf(path: Path, folder: Path) -> Any:
    """De-quantize a GGUF to a float32 model; save it, its tokenizer and META_FILE in folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    except Exception as e:
        raise ModelError(f"cannot load GGUF {path} with transformers: {e}") from None
    _drop_gguf_quantizer(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        meta = {"fingerprint": gguf_fingerprint(path), "gguf": path.name, "format": 1}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        if not (folder / META_FILE).exists():  # else another process finished first
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete earlier conversion
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def _drop_gguf_quantizer(model: Any) -> None:
    """transformers keeps its GGUF quantizer on a fully de-quantized model, and then refuses to
    save it; drop the quantizer once every weight is a plain float tensor."""
    if any(not p.dtype.is_floating_point for p in model.parameters()) or any(
        type(m).__name__.startswith("Gguf") for m in model.modules()
    ):
        raise ModelError("transformers kept GGUF weights packed; cannot convert them to float")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


class _StackedLayer(DynamicLayer):
    """One layer of a batch cache over B sequences' own cache layers.

    The sequences' keys and values are padded on the right to l_max and stacked only when the
    model reaches this layer (``update``), and the stack is not kept: the padded copy of the
    batch [B, H, l_max + N, D] lives for one layer's attention, not for the whole pass (with
    every layer stacked up front, a pass of 8 sessions at 300 tokens on SmolLM2 held 124 MB
    more than a pass of one). The new entries [B, H, N, D] are kept for the sequences' caches.
    """

    def __init__(self, own: list[Any], lens: list[int], l_max: int) -> None:
        super().__init__()
        self.own, self.lens, self.l_max = own, lens, l_max
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.new = (key_states, value_states)  # [B, H, N, D]
        return self._stack(key_states, "keys"), self._stack(value_states, "values")

    def _stack(self, new: torch.Tensor, which: str) -> torch.Tensor:
        b, h, n, d = new.shape
        out = new.new_zeros(b, h, self.l_max + n, d)  # [B, H, l_max + N, D]
        for i, (layer, length) in enumerate(zip(self.own, self.lens, strict=True)):
            if length:
                out[i, :, :length] = getattr(layer, which)[0]
        out[:, :, self.l_max :] = new
        return out

    def get_seq_length(self) -> int:
        return self.l_max
