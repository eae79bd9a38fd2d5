"""How much a pass's size changes SmolLM2's logits: five tokens in one pass against five
one-token passes, and against passes of 2 + 3, for bfloat16 (packed and PyTorch's own
linears) and float32. The largest absolute difference of the logits, each way.

    python scripts/pass_size_logits.py
"""

from __future__ import annotations

import numpy as np

from specsplit.backends import torch_backend
from specsplit.backends.torch_backend import TorchBackend


def differences(b: TorchBackend) -> tuple[float, float]:
    ids = b.tokenizer.encode("The three primary colors are red, green and", add_special=False)
    s = b.new_sequence()
    b.prefill(s, ids)
    n = b.length(s)
    toks = [300, 400, 500, 600, 700]
    five = b.forward(s, toks)  # [5, V]
    b.truncate(s, n)
    ones = np.stack([b.forward(s, [t])[0] for t in toks])  # [5, V]
    b.truncate(s, n)
    split = np.concatenate([b.forward(s, toks[:2]), b.forward(s, toks[2:])])  # [5, V]
    return float(np.abs(five - ones).max()), float(np.abs(five - split).max())


def main() -> None:
    packed = TorchBackend.load("smollm2-135m", threads=2, dtype="bfloat16")
    can_pack = torch_backend.can_pack
    torch_backend.can_pack = lambda *a: False
    plain = TorchBackend.load("smollm2-135m", threads=2, dtype="bfloat16")
    torch_backend.can_pack = can_pack
    wide = TorchBackend.load("smollm2-135m", threads=2, dtype="float32")
    for name, b in (("bfloat16 packed", packed), ("bfloat16", plain), ("float32", wide)):
        one, two = differences(b)
        print(f"{name:>16}: 5 tokens vs 5 x 1: {one:.3g}; vs 2 + 3: {two:.3g}")


if __name__ == "__main__":
    main()
