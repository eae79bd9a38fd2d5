"""Hugging Face generation as a comparison system: assisted generation and prompt lookup.

Runs ``model.generate`` on the same torch model object the torch backend holds, greedy,
with the same EOS ids, and times it the same way (arrival to last token, prefill included).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from specsplit.errors import ConfigError


def hf_generate(
    model,
    ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    assistant=None,
    prompt_lookup: int = 0,
) -> tuple[list[int], float, bool]:
    """Greedy HF generate; returns (new ids without EOS, seconds, whether it ended at EOS)."""
    import torch

    if model is None:
        raise ConfigError("HF systems need the torch target backend")
    x = torch.tensor([list(ids)], device=model.device)
    kw = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(eos_ids),
        pad_token_id=list(eos_ids)[0],
        attention_mask=torch.ones_like(x),
    )
    if assistant is not None:
        kw["assistant_model"] = assistant
    if prompt_lookup:
        kw["prompt_lookup_num_tokens"] = prompt_lookup
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, **kw)
    dt = time.perf_counter() - t0
    new = out[0, len(ids) :].tolist()
    eos = set(eos_ids)
    for i, t in enumerate(new):
        if t in eos:
            return new[:i], dt, True
    return new, dt, False
