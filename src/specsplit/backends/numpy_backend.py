"""The NumPy reference backend: a llama / qwen2 forward in plain NumPy with KV caches.

Slow but readable; the forward math lives in numpy_model.py. Weights come from a GGUF file
(every tensor de-quantized to float32 or float64) or from an in-memory transformers model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from specsplit import registry
from specsplit.backends.base import Backend, Tokenizer
from specsplit.backends.numpy_model import (
    ARCHITECTURES,
    KVCache,
    LayerWeights,
    ModelConfig,
    ModelWeights,
    Transformer,
    tree_layout,
)
from specsplit.errors import ConfigError, ModelError

DTYPES = (np.float32, np.float64)


class NumpyBackend(Backend):
    """A NumPy transformer (llama / qwen2) with one KV cache per sequence; supports trees."""

    name = "numpy"
    supports_tree = True

    def __init__(self, model: Transformer, tokenizer: Tokenizer, n_ctx: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = model.cfg.vocab_size
        if tokenizer.vocab_size > self.vocab_size:
            raise ModelError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only {self.vocab_size}"
            )
        self.n_ctx = int(n_ctx or model.cfg.n_ctx)
        if self.n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1, got {self.n_ctx}")
        self._caches: dict[int, KVCache] = {}
        self._next_seq = 0

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(
        cls, path_or_name: str, dtype: Any = np.float32, n_ctx: int | None = None
    ) -> NumpyBackend:
        """A model from a .gguf path or a registry name, de-quantized to ``dtype``."""
        from specsplit.backends.gguf_tokenizer import GGUFTokenizer, open_gguf

        np_dtype = _check_dtype(dtype)
        path = registry.resolve_gguf(str(path_or_name))
        reader = open_gguf(path)
        model = Transformer(*read_gguf(reader, path.name, np_dtype), dtype=np_dtype)
        return cls(model, GGUFTokenizer(path, reader), n_ctx=n_ctx)

    @classmethod
    def from_torch(
        cls, model: Any, tokenizer: Tokenizer, dtype: Any = None, n_ctx: int | None = None
    ) -> NumpyBackend:
        """A copy of a transformers LlamaForCausalLM / Qwen2ForCausalLM; ``dtype`` defaults to
        float64 for a float64 model and float32 otherwise."""
        import torch

        if dtype is None:
            dtype = np.float64 if model.dtype == torch.float64 else np.float32
        np_dtype = _check_dtype(dtype)
        cfg, weights = _read_torch(model, np_dtype)
        return cls(Transformer(cfg, weights, dtype=np_dtype), tokenizer, n_ctx=n_ctx)

    # ---- sequences -----------------------------------------------------------------------

    def new_sequence(self) -> int:
        """Open an empty sequence (its own KV cache) and return its id."""
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        self._caches[seq] = self.model.new_cache()
        return seq

    def free_sequence(self, seq: int) -> None:
        """Drop a sequence and its KV cache."""
        self._cache(seq)
        del self._caches[seq]

    def length(self, seq: int) -> int:
        """Tokens in the sequence's KV cache."""
        return self._cache(seq).length

    def _cache(self, seq: int) -> KVCache:
        """The sequence's cache, or a ConfigError for an unknown id."""
        try:
            return self._caches[seq]
        except KeyError:
            raise ConfigError(f"unknown sequence {seq}") from None

    # ---- forward -------------------------------------------------------------------------

    def forward(
        self, seq: int, tokens: Sequence[int], parents: Sequence[int] | None = None
    ) -> np.ndarray:
        """Append tokens [n] (a chain, or a tree by ``parents``); return logits [n, V]."""
        cache = self._cache(seq)
        ids = np.asarray([int(t) for t in tokens], dtype=np.int64)  # [n]
        n, start = len(ids), cache.length
        if n and not (0 <= ids.min() and ids.max() < self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ConfigError(f"token id {bad} out of range [0, {self.vocab_size})")
        if start + n > self.n_ctx:
            raise ConfigError(
                f"sequence would hold {start + n} tokens, more than n_ctx={self.n_ctx}"
            )
        if parents is None:
            parents = range(-1, n - 1)  # a chain
        elif len(parents) != n:
            raise ConfigError(f"{len(parents)} parents for {n} tokens")
        if n == 0:
            return np.zeros((0, self.vocab_size), dtype=self.model.dtype)
        depth, visible = tree_layout([int(p) for p in parents])  # [n], [n, n]
        try:
            return self.model.forward(ids, start + depth, cache, visible)  # [n, V]
        except BaseException:
            cache.truncate(start)  # a failed call may have written some layers
            raise

    # ---- cache editing -------------------------------------------------------------------

    def truncate(self, seq: int, length: int) -> None:
        """Roll the cache back to its first ``length`` tokens."""
        cache = self._cache(seq)
        if not 0 <= length <= cache.length:
            raise ConfigError(f"cannot truncate a {cache.length}-token sequence to {length}")
        cache.truncate(length)

    def keep(self, seq: int, start: int, indices: Sequence[int]) -> None:
        """Keep cache entries [0, start) and the new tokens at start + indices."""
        cache = self._cache(seq)
        idx = [int(i) for i in indices]
        n_new = cache.length - start
        if not 0 <= start <= cache.length or any(not 0 <= i < n_new for i in idx):
            raise ConfigError(f"keep({start}, {idx}) out of range for length {cache.length}")
        cache.keep(start, idx)

    def close(self) -> None:
        """Drop every sequence."""
        self._caches.clear()


# ---- loading helpers ---------------------------------------------------------------------


def _check_dtype(dtype: Any) -> np.dtype:
    """float32 or float64 (as a type, dtype or name); anything else is a ConfigError."""
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    if d not in [np.dtype(t) for t in DTYPES]:
        raise ConfigError(f"numpy backend dtype must be float32 or float64, got {dtype!r}")
    return d


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of llama Q/K rows, [n_heads * D, ...]: GGUF
    stores each head's rows as interleaved (even, odd) pairs; transformers wants halves."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """A scalar GGUF metadata value; ModelError when missing and no default."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelError(f"GGUF file lacks metadata {key!r}")
        return default
    return field.contents()


def _gguf_config(reader: Any, n_vocab: int, where: str) -> ModelConfig:
    """Hyper-parameters from GGUF metadata (``{arch}.block_count`` and friends)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"{where}: architecture {arch!r} not supported (only llama, qwen2)")
    d_model = int(_field(reader, f"{arch}.embedding_length"))
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", d_model // n_heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if rope_dim != head_dim or scaling not in ("none", ""):
        raise ModelError(f"{where}: rope scaling / partial rotary dims not supported")
    return ModelConfig(
        arch=arch,
        n_layers=int(_field(reader, f"{arch}.block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(_field(reader, f"{arch}.feed_forward_length")),
        vocab_size=n_vocab,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        n_ctx=int(_field(reader, f"{arch}.context_length")),
    )


def read_gguf(reader: Any, where: str, dtype: Any) -> tuple[ModelConfig, ModelWeights]:
    """Config and de-quantized weights from an open GGUF file of a llama / qwen2 model."""
    from gguf.quants import dequantize

    dtype = _check_dtype(dtype)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str, optional: bool = False) -> np.ndarray | None:
        t = tensors.get(name)
        if t is None:
            if optional:
                return None
            raise ModelError(f"{where}: GGUF file lacks tensor {name!r}")
        return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=dtype)

    embed = get("token_embd.weight")  # [V, d]
    cfg = _gguf_config(reader, embed.shape[0], where)
    if "rope_freqs.weight" in tensors:
        raise ModelError(f"{where}: rope frequency factors (llama 3.1 style) not supported")
    permuted = cfg.arch == "llama"  # llama.cpp's converter permutes llama Q/K only
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        wq, wk = get(p + "attn_q.weight"), get(p + "attn_k.weight")  # [H*D, d], [K*D, d]
        bq, bk = get(p + "attn_q.bias", True), get(p + "attn_k.bias", True)  # [H*D], [K*D]
        if permuted:
            wq, wk = _unpermute_rope(wq, cfg.n_heads), _unpermute_rope(wk, cfg.n_kv_heads)
            bq = None if bq is None else _unpermute_rope(bq, cfg.n_heads)
            bk = None if bk is None else _unpermute_rope(bk, cfg.n_kv_heads)
        layers.append(
            LayerWeights(
                attn_norm=get(p + "attn_norm.weight"),
                wq=wq,
                wk=wk,
                wv=get(p + "attn_v.weight"),
                wo=get(p + "attn_output.weight"),
                bq=bq,
                bk=bk,
                bv=get(p + "attn_v.bias", True),
                bo=get(p + "attn_output.bias", True),
                ffn_norm=get(p + "ffn_norm.weight"),
                w_gate=get(p + "ffn_gate.weight"),
                w_up=get(p + "ffn_up.weight"),
                w_down=get(p + "ffn_down.weight"),
            )
        )
    lm_head = get("output.weight", True)  # [V, d]
    if lm_head is None:  # tied to the token embedding
        lm_head = embed
    weights = ModelWeights(embed, layers, get("output_norm.weight"), lm_head)
    _check_shapes(cfg, weights, where)
    return cfg, weights


def _check_shapes(cfg: ModelConfig, w: ModelWeights, where: str) -> None:
    """ModelError unless every weight has the shape the config implies."""
    H, K, D, d, F, V = (
        cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff, cfg.vocab_size
    )  # fmt: skip
    if H % K:
        raise ModelError(f"{where}: {H} query heads not a multiple of {K} key/value heads")
    want = {"embed": (V, d), "out_norm": (d,), "lm_head": (V, d)}
    got = {"embed": w.embed.shape, "out_norm": w.out_norm.shape, "lm_head": w.lm_head.shape}
    layer_want = {
        "attn_norm": (d,), "wq": (H * D, d), "wk": (K * D, d), "wv": (K * D, d),
        "wo": (d, H * D), "bq": (H * D,), "bk": (K * D,), "bv": (K * D,), "bo": (d,), "ffn_norm": (d,),
        "w_gate": (F, d), "w_up": (F, d), "w_down": (d, F),
    }  # fmt: skip
    for i, layer in enumerate(w.layers):
        for name, shape in layer_want.items():
            arr = getattr(layer, name)
            if arr is not None:
                want[f"layers.{i}.{name}"], got[f"layers.{i}.{name}"] = shape, arr.shape
    for name, shape in want.items():
        if tuple(got[name]) != shape:
            raise ModelError(f"{where}: weight {name} has shape {tuple(got[name])}, want {shape}")


def _read_torch(model: Any, dtype: np.dtype) -> tuple[ModelConfig, ModelWeights]:
    """Config and weights (copied to NumPy) of a transformers llama / qwen2 causal LM."""
    c = model.config.get_text_config(decoder=True)
    if c.model_type not in ARCHITECTURES:
        raise ModelError(f"model type {c.model_type!r} not supported (only llama, qwen2)")
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or getattr(c, "mlp_bias", False):
        raise ModelError("numpy backend supports default rope and bias-free MLPs only")
    if getattr(c, "use_sliding_window", False) or c.hidden_act != "silu":
        raise ModelError("numpy backend supports full attention and SiLU MLPs only")
    n_heads = int(c.num_attention_heads)
    sd = {k: v.detach().cpu().double().numpy().astype(dtype) for k, v in model.state_dict().items()}
    head = model.get_output_embeddings().weight.detach().cpu().double().numpy().astype(dtype)
    cfg = ModelConfig(
        arch=c.model_type,
        n_layers=int(c.num_hidden_layers),
        d_model=int(c.hidden_size),
        n_heads=n_heads,
        n_kv_heads=int(c.num_key_value_heads or n_heads),
        head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // n_heads),
        d_ff=int(c.intermediate_size),
        vocab_size=int(c.vocab_size),
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        rms_eps=float(c.rms_norm_eps),
        n_ctx=int(c.max_position_embeddings),
    )
    layers = []
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                attn_norm=sd[p + "input_layernorm.weight"],
                wq=sd[p + "self_attn.q_proj.weight"],
                wk=sd[p + "self_attn.k_proj.weight"],
                wv=sd[p + "self_attn.v_proj.weight"],
                wo=sd[p + "self_attn.o_proj.weight"],
                bq=sd.get(p + "self_attn.q_proj.bias"),
                bk=sd.get(p + "self_attn.k_proj.bias"),
                bv=sd.get(p + "self_attn.v_proj.bias"),
                bo=sd.get(p + "self_attn.o_proj.bias"),
                ffn_norm=sd[p + "post_attention_layernorm.weight"],
                w_gate=sd[p + "mlp.gate_proj.weight"],
                w_up=sd[p + "mlp.up_proj.weight"],
                w_down=sd[p + "mlp.down_proj.weight"],
            )
        )
    weights = ModelWeights(sd["model.embed_tokens.weight"], layers, sd["model.norm.weight"], head)
    _check_shapes(cfg, weights, type(model).__name__)
    return cfg, weights
