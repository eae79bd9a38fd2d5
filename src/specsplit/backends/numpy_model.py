"""The forward math of a llama / qwen2 decoder in plain NumPy: the readable reference.

One decoder layer is ``h = x + attention(rms_norm(x)); out = h + mlp(rms_norm(h))`` with
rotary position embeddings on queries and keys, grouped-query attention (each key/value
head serves ``n_heads // n_kv_heads`` query heads) and a SwiGLU MLP. Weights use the
transformers layout: a linear layer's matrix is [out_features, in_features] and ``y = x @ W.T``;
rotary embeddings rotate the two halves of each head (transformers' ``rotate_half``).

Shape letters: n new tokens, T cached + new tokens, d hidden size, H query heads, K key/value
heads, G = H // K query heads per key/value head, D head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specsplit.backends.tree import tree_layout  # noqa: F401  (re-exported)

ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one decoder-only transformer."""

    arch: str  # "llama" or "qwen2"
    n_layers: int
    d_model: int  # hidden size d
    n_heads: int  # query heads H
    n_kv_heads: int  # key/value heads K
    head_dim: int  # D
    d_ff: int  # MLP width F
    vocab_size: int  # V (rows of the output embedding)
    rope_theta: float  # rotary base frequency
    rms_eps: float  # RMSNorm epsilon
    n_ctx: int  # the most positions the model was trained for


@dataclass
class LayerWeights:
    """The weights of one decoder layer, [out, in] for every matrix."""

    attn_norm: np.ndarray  # [d]
    wq: np.ndarray  # [H * D, d]
    wk: np.ndarray  # [K * D, d]
    wv: np.ndarray  # [K * D, d]
    wo: np.ndarray  # [d, H * D]
    bq: np.ndarray | None  # [H * D] (qwen2; llama with attention_bias)
    bk: np.ndarray | None  # [K * D]
    bv: np.ndarray | None  # [K * D]
    bo: np.ndarray | None  # [d] (llama with attention_bias)
    ffn_norm: np.ndarray  # [d]
    w_gate: np.ndarray  # [F, d]
    w_up: np.ndarray  # [F, d]
    w_down: np.ndarray  # [d, F]


@dataclass
class ModelWeights:
    """All the weights: token embedding, layers, final norm and output embedding."""

    embed: np.ndarray  # [V, d]
    layers: list[LayerWeights]
    out_norm: np.ndarray  # [d]
    lm_head: np.ndarray  # [V, d] (the same array as embed when tied)


class KVCache:
    """Rotated keys and values of one sequence for every layer, with room to grow."""

    def __init__(self, cfg: ModelConfig, dtype: np.dtype, capacity: int = 64) -> None:
        shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = np.zeros(shape, dtype=dtype)  # [L, K, capacity, D]
        self.v = np.zeros(shape, dtype=dtype)  # [L, K, capacity, D]
        self.length = 0  # entries [0, length) are valid

    def reserve(self, n: int) -> None:
        """Make room for n more entries (doubling the capacity as needed)."""
        capacity = self.k.shape[2]
        if self.length + n <= capacity:
            return
        new_capacity = max(2 * capacity, self.length + n)
        grow = [(0, 0), (0, 0), (0, new_capacity - capacity), (0, 0)]
        self.k = np.pad(self.k, grow)
        self.v = np.pad(self.v, grow)

    def truncate(self, length: int) -> None:
        """Forget every entry from ``length`` on."""
        self.length = length

    def keep(self, start: int, indices: Sequence[int]) -> None:
        """Keep entries [0, start) followed by the entries at start + indices, in order."""
        rows = start + np.asarray(indices, dtype=np.int64)  # [k]
        end = start + len(rows)
        self.k[:, :, start:end] = self.k[:, :, rows]  # fancy indexing copies before writing
        self.v[:, :, start:end] = self.v[:, :, rows]
        self.length = end


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis; x [n, d] -> [n, d]."""
    variance = np.mean(x * x, axis=-1, keepdims=True)  # [n, 1]
    return x / np.sqrt(variance + eps) * weight


def rope_cos_sin(
    positions: np.ndarray, head_dim: int, theta: float, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [n, D/2] of angle position * theta^(-2i/D), computed in float64."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [D/2]
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [n, D/2]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each head's (first half, second half) pairs; x [n, heads, D], cos/sin [n, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [n, heads, D/2] each
    c, s = cos[:, None, :], sin[:, None, :]  # [n, 1, D/2]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)  # [n, heads, D]


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (rows of -inf but one finite entry are fine)."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), written with tanh so that it never overflows."""
    return 0.5 * x * (1.0 + np.tanh(0.5 * x))


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ w.T (+ b); x [n, in], w [out, in] -> [n, out]."""
    y = x @ w.T
    return y if b is None else y + b


class Transformer:
    """A llama / qwen2 decoder: weights, config and the forward pass over a KV cache."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, dtype: np.dtype) -> None:
        self.cfg = cfg
        self.weights = weights
        self.dtype = np.dtype(dtype)

    def new_cache(self) -> KVCache:
        """An empty KV cache for one sequence."""
        return KVCache(self.cfg, self.dtype)

    def forward(
        self, tokens: np.ndarray, positions: np.ndarray, cache: KVCache, visible: np.ndarray
    ) -> np.ndarray:
        """Run tokens [n] at positions [n] after the cache's entries; ``visible`` [n, n] says
        which new tokens each new token attends to (it always sees the whole cache).
        Appends the new keys/values to the cache and returns logits [n, V]."""
        n, start = len(tokens), cache.length
        cache.reserve(n)
        allowed = np.ones((n, start + n), dtype=bool)  # [n, T]
        allowed[:, start:] = visible
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
        x = self.weights.embed[tokens]  # [n, d]
        for li, layer in enumerate(self.weights.layers):
            h = rms_norm(x, layer.attn_norm, self.cfg.rms_eps)  # [n, d]
            x = x + self._attention(li, layer, h, cos, sin, cache, allowed)
            h = rms_norm(x, layer.ffn_norm, self.cfg.rms_eps)  # [n, d]
            x = x + self._mlp(layer, h)
        cache.length = start + n
        x = rms_norm(x, self.weights.out_norm, self.cfg.rms_eps)  # [n, d]
        return linear(x, self.weights.lm_head)  # [n, V]

    def _attention(
        self,
        li: int,
        layer: LayerWeights,
        x: np.ndarray,
        cos: np.ndarray,
        sin: np.ndarray,
        cache: KVCache,
        allowed: np.ndarray,
    ) -> np.ndarray:
        """Grouped-query self-attention of x [n, d] over the cache and itself -> [n, d]."""
        cfg = self.cfg
        n, (H, K, D) = x.shape[0], (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        G, start, T = H // K, cache.length, cache.length + x.shape[0]
        q = linear(x, layer.wq, layer.bq).reshape(n, H, D)  # [n, H, D]
        k = linear(x, layer.wk, layer.bk).reshape(n, K, D)  # [n, K, D]
        v = linear(x, layer.wv, layer.bv).reshape(n, K, D)  # [n, K, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[li, :, start:T] = k.transpose(1, 0, 2)  # [K, n, D]
        cache.v[li, :, start:T] = v.transpose(1, 0, 2)  # [K, n, D]
        keys, values = cache.k[li, :, :T], cache.v[li, :, :T]  # [K, T, D]
        # query head h uses key/value head h // G: group the queries by their kv head
        qg = q.reshape(n, K, G, D).transpose(1, 2, 0, 3).reshape(K, G * n, D)  # [K, G*n, D]
        scores = qg @ keys.transpose(0, 2, 1) * (D**-0.5)  # [K, G*n, T]
        mask = np.tile(allowed, (G, 1))  # [G*n, T]: row g*n + i belongs to token i
        probs = softmax(np.where(mask, scores, -np.inf))  # [K, G*n, T]
        out = probs @ values  # [K, G*n, D]
        out = out.reshape(K, G, n, D).transpose(2, 0, 1, 3).reshape(n, H * D)  # [n, H*D]
        return linear(out, layer.wo, layer.bo)  # [n, d]

    def _mlp(self, layer: LayerWeights, x: np.ndarray) -> np.ndarray:
        """SwiGLU: down(silu(gate(x)) * up(x)); x [n, d] -> [n, d]."""
        hidden = silu(linear(x, layer.w_gate)) * linear(x, layer.w_up)  # [n, F]
        return linear(hidden, layer.w_down)  # [n, d]
