"""Token-tree layout shared by the backends: depths and who attends to whom."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from specsplit.errors import ConfigError


def tree_layout(parents: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Depths [n] and the ancestor-or-self matrix [n, n] (row i: the new tokens i attends to).

    parents[i] is the index of token i's parent among the new tokens, -1 for the cached prefix.
    """
    n = len(parents)
    depth = np.zeros(n, dtype=np.int64)  # [n]
    anc = np.eye(n, dtype=bool)  # [n, n]
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ConfigError(f"parents[{i}] = {p}: a parent must be -1 or an earlier index")
        if p >= 0:
            depth[i] = depth[p] + 1
            anc[i] |= anc[p]
    return depth, anc
