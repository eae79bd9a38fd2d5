"""One Qwen 1.5B MLP matrix (8960 x 1536) through PyTorch's linear and through the packed
linear of backends/torch_packed.py, for a few row counts: milliseconds per call (mean of 20
after 3 untimed) and the largest difference of the outputs.

    python scripts/packed_linear.py [bfloat16|float16|float32] [threads]
"""

from __future__ import annotations

import sys
import time

import torch

from specsplit.backends.torch_packed import ROWS_HINT


def per_call(f, x: torch.Tensor, n: int = 20) -> float:  # noqa: ANN001
    for _ in range(3):
        f(x)
    t0 = time.perf_counter()
    for _ in range(n):
        f(x)
    return (time.perf_counter() - t0) / n


def main() -> None:
    dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    w = torch.randn(8960, 1536, dtype=dtype)  # [out, in]
    packed = torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT)

    def plain(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, w)

    def fast(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    print(f"{dtype}, {torch.get_num_threads()} threads")
    for rows in (1, 5, 13, 40, 104, 256, 1024):
        x = torch.randn(rows, 1536, dtype=dtype)  # [rows, in]
        diff = (plain(x).float() - fast(x).float()).abs().max().item()
        print(
            f"{rows:5d} rows: linear {per_call(plain, x) * 1e3:7.2f} ms, "
            f"packed {per_call(fast, x) * 1e3:7.2f} ms, max difference {diff:.3g}"
        )


if __name__ == "__main__":
    main()
