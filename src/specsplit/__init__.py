"""specsplit: lossless speculative decoding, whole on one machine or split across machines.

References: Leviathan, Kalman, Matias 2023 (speculative decoding); Chen et al. 2023
(speculative sampling); Miao et al. 2024, SpecInfer (multi-draft / token-tree verification).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
