"""specsplit: lossless speculative decoding, whole on one machine or split across machines.

References: Leviathan, Kalman, Matias 2023 (speculative decoding); Chen et al. 2023
(speculative sampling); Miao et al. 2024, SpecInfer (multi-draft / token-tree verification).
"""

import os

# One process may run PyTorch and llama.cpp on the same cores, one after the other; both use
# OpenMP here. Threads that spin-wait long after a parallel region steal the cores from the
# other runtime (measured: a 0.5B llama.cpp draft token took 2.7 s instead of 16 ms next to
# a torch target), while no spinning at all halves llama.cpp's speed. A short spin (10k
# iterations) measured best for both. Only takes effect if set before OpenMP starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"

__all__ = ["__version__"]
