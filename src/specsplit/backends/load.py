"""Load a backend by kind ("torch", "llama.cpp", "numpy") and model reference."""

from __future__ import annotations

from specsplit.backends.base import Backend
from specsplit.errors import ConfigError

BACKENDS = ("torch", "llama.cpp", "numpy")
# a torch model's number type; auto: bfloat16 on CUDA and on CPUs with AMX, else float32
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_device(device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N'; anything else is a one-line error."""
    d = device.strip().lower()
    if d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise ConfigError(f"device must be cpu, cuda or cuda:N, got {device!r}")


def load_backend(
    kind: str,
    ref: str,
    *,
    device: str = "cpu",
    threads: int | None = None,
    n_ctx: int | None = None,
    dtype: str | None = None,
) -> Backend:
    """A backend of the given kind for a model name, GGUF path, folder or hub id.

    ``dtype`` (torch only, default float32): the weights' and activations' type; bfloat16
    verifies several tokens for the price of one on CPUs with AMX (see the README)."""
    device = check_device(device)
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if dtype is not None and kind != "torch":
        raise ConfigError(f"--dtype applies to the torch backend, not {kind} (its GGUF sets it)")
    if kind == "torch":
        try:
            from specsplit.backends.torch_backend import TorchBackend
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"the torch backend needs {e.name}, which is not installed: "
                "pip install 'specsplit[torch]' (or use --target-backend llama.cpp)"
            ) from None

        return TorchBackend.load(
            ref, device=device, threads=threads, n_ctx=n_ctx, dtype=dtype or "float32"
        )
    if kind == "llama.cpp":
        from specsplit.backends.llamacpp_backend import LlamaCppBackend

        gpu_layers = -1 if device.startswith("cuda") else 0
        return LlamaCppBackend.load(
            ref, n_ctx=n_ctx or 4096, threads=threads, gpu_layers=gpu_layers
        )
    if kind == "numpy":
        if device != "cpu":
            raise ConfigError("the numpy backend runs on the cpu only")
        try:
            from specsplit.backends.numpy_backend import NumpyBackend
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"the numpy backend reads GGUF files with {e.name}: pip install 'specsplit[torch]'"
            ) from None

        return NumpyBackend.load(ref)
    raise ConfigError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
