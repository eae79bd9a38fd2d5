"""Linear layers with their weights packed once for oneDNN, for bfloat16 and float16 on CPU.

PyTorch runs a CPU bfloat16 ``linear`` through oneDNN, which reorders the weight matrix into
its blocked (AMX / AVX-512) layout on every call: at the few rows a verification pass has,
that reorder costs more than the product. ``pack_linears`` does the reorder once, at load, and
runs the layers with ``torch.ops.mkldnn._linear_pointwise`` on the packed weights (what
PyTorch's inductor does for frozen CPU models). Where ``F.linear`` calls oneDNN the kernel
is the same one, and the outputs are equal bit for bit (tests/test_torch_backend.py); at one
row PyTorch may take another kernel, whose last bits differ (a bfloat16 pass's logits
already depend on its size: see bench/ties.py). On this 2-core AMX CPU, one 8960 x 1536
bfloat16 matrix (``python scripts/packed_linear.py``, 2 threads): one row 2.48 -> 1.77 ms,
40 rows 5.16 -> 2.75 ms, 256 rows 18.9 -> 14.4 ms, 1024 rows 66.8 -> 50.4 ms.

float32 is left alone: there PyTorch calls MKL, whose sums differ in the last bits from
oneDNN's, and exactness tests compare float32 models with their own unpacked passes.
"""

from __future__ import annotations

from typing import Any

import torch

PACKED_DTYPES = (torch.bfloat16, torch.float16)
ROWS_HINT = 64  # the row count oneDNN tunes the packed layout for (verification passes)


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` with its weight in oneDNN's layout (a buffer, not a parameter: the
    packed tensor is opaque, so it stays out of ``state_dict``)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()  # [out, in]
        packed = torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(model: Any, device: torch.device) -> bool:
    """A CPU model in bfloat16 or float16, and a PyTorch with oneDNN's packed linear."""
    return (
        device.type == "cpu"
        and model.dtype in PACKED_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` whose weight no other module shares (a tied lm_head stays,
    or it would be held twice) by a ``PackedLinear``; the number replaced."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and owners[child.weight.data_ptr()] == 1:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
