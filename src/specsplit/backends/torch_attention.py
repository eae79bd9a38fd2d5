"""Which attention the torch backend runs a transformers model with, and why it is exact.

Tree forwards and batches hand the model a 4D additive mask; the attention must apply it in
the model's own precision, or a float64 model's tree rows would differ from its chain rows.

- "sdpa" where transformers offers it (most models): exact.
- Gemma 2 has no sdpa in transformers: it soft-caps attention logits (``tanh(s / c) * c``),
  which sdpa cannot do, so it runs "eager". Eager takes its softmax in float32; ``eager_attention``
  below is Gemma 2's eager attention with the softmax in float32 *or wider* (float64 for a
  float64 model): op for op what eager computes for float32, float16 and bfloat16 models, and
  exact for float64 ones. It is registered with transformers as ``EAGER``.
- Any other model without sdpa is refused: its eager attention may carry more than soft-capping
  (attention sinks, position biases) that a replacement would silently drop.
"""

from __future__ import annotations

from typing import Any

import torch

from specsplit.errors import ModelError

EAGER = "specsplit_eager"  # the name eager_attention is registered under
EAGER_MODEL_TYPES = frozenset({"gemma2"})  # eager needs only scaling and soft-capping


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, n, D], key and value [B, K, L, D], attention_mask [B, 1, n, L] (0 = may
    attend, dtype-min = may not) -> output [B, n, H, D] and weights [B, H, n, L]."""
    if attention_mask is None and query.shape[2] > 1:
        raise ModelError("eager attention over several tokens needs a causal mask")
    groups = query.shape[1] // key.shape[1]  # query heads per key/value head
    b, k, length, d = key.shape
    key = key[:, :, None].expand(b, k, groups, length, d).reshape(b, k * groups, length, d)
    value = value[:, :, None].expand(b, k, groups, length, d).reshape(b, k * groups, length, d)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, n, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    wide = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores, dim=-1, dtype=wide).to(query.dtype)  # [B, H, n, L]
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)  # [B, H, n, D]
    return out.transpose(1, 2).contiguous(), weights


def use_exact_attention(model: Any) -> None:
    """Switch the model to sdpa, or to ``eager_attention`` for Gemma 2; ModelError otherwise."""
    model_type = model.config.get_text_config(decoder=True).model_type
    if model_type in EAGER_MODEL_TYPES:
        _register()
        model.set_attn_implementation(EAGER)
        return
    if model.config._attn_implementation == "sdpa":
        return
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError):
        raise ModelError(
            f"{model_type}: transformers has no sdpa attention for this model, and the torch "
            "backend needs it to apply tree and batch masks exactly; use the llama.cpp backend"
        ) from None


def _register() -> None:
    """Make EAGER a transformers attention implementation (with eager's mask builder)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EAGER, eager_attention)
    AttentionMaskInterface.register(EAGER, eager_mask)
