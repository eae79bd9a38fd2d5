"""Shared fixtures: tiny toy language models for the math tests."""

from __future__ import annotations

import numpy as np


class ToyLM:
    """A fixed random next-token distribution for every prefix (vocab V), from a seed."""

    def __init__(self, vocab: int, seed: int, sharpness: float = 2.0) -> None:
        self.vocab, self.seed, self.sharpness = vocab, seed, sharpness
        self._memo: dict[tuple[int, ...], np.ndarray] = {}

    def logits(self, prefix: tuple[int, ...]) -> np.ndarray:
        out = self._memo.get(prefix)
        if out is None:
            h = hash((self.seed, prefix)) % (2**32)
            out = self._memo[prefix] = np.random.default_rng(h).normal(size=self.vocab)
            out *= self.sharpness
        return out


# ---- tiny transformer models built in-process (no download) ----

from collections.abc import Sequence  # noqa: E402

from specsplit.backends.base import Tokenizer  # noqa: E402


class TinyTokenizer(Tokenizer):
    """Letters as tokens over a small vocabulary; no EOS unless given."""

    def __init__(self, vocab: int, eos: int | None = None) -> None:
        self.vocab_size = vocab
        self.bos_token_id = None
        self.eos_token_ids = frozenset() if eos is None else frozenset({eos})

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return [(ord(c) - 97) % self.vocab_size for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    def apply_chat_template(self, messages):
        return None

    def fingerprint(self) -> str:
        return f"tiny:{self.vocab_size}"


def tiny_llama(vocab: int = 300, seed: int = 0, layers: int = 2, dtype=None):
    """A random LlamaForCausalLM, float64 by default, with sharper-than-init logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.15,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(dtype or torch.float64).eval()
    return model


def perturbed(model, eps: float, seed: int):
    """A copy of model with Gaussian noise of scale eps on every weight: a drafter that
    mostly agrees with the target but not always."""
    import copy

    import torch

    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * eps * p.std())
    return m


# ---- a real server process (HTTP face tests) ----

import contextlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def specsplit_serve(*args: str, start_timeout: float = 300.0):
    """`specsplit serve --port 0 --http-port P ARGS` as a subprocess on loopback, the way a
    user starts it; yields the HTTP base URL once /health answers; SIGTERM at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "specsplit.faces.cli", "serve", "--port", "0"]
    with tempfile.TemporaryFile("w+") as log:  # (a pipe nobody reads would fill and block)
        proc = subprocess.Popen(
            [*cmd, "--http-port", str(port), *args], stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            end = time.monotonic() + start_timeout
            while not _answers(url + "/health"):
                if proc.poll() is not None or time.monotonic() > end:
                    log.seek(0)
                    raise RuntimeError(f"specsplit serve did not start: {log.read()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
