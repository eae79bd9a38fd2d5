"""Shared fixtures: tiny toy language models for the math tests, tiny transformers models,
and SmolLM2-135M fetched once per session into the cache in use.

Rules that keep the default run correct on a fresh machine and short (`.ci/run` checks the
first two): a test that uses SmolLM2, in process or through a `specsplit` subprocess, asks
for ``smollm2_gguf`` (or ``smollm2_converted`` for the torch backend); a test that needs a
Qwen model, or takes minutes, is marked slow; a model is loaded once per file (module
fixtures), and servers listen on port 0.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

SMOLLM2 = "smollm2-135m"


@pytest.fixture(scope="session")
def smollm2_gguf(request: pytest.FixtureRequest) -> Path:
    """SmolLM2-135M's GGUF in the cache in use (``$SPECSPLIT_CACHE``), fetched once per session.

    Every test that uses SmolLM2, in process or through a `specsplit` subprocess, asks for this
    first, so no test's output (such as the fetch progress a first use prints on standard
    error) depends on what an earlier test or run left in the cache. On an empty cache the
    progress is shown live, since the fetch can take a minute.
    """
    from specsplit import registry

    capture = request.config.pluginmanager.getplugin("capturemanager")

    def log(line: str) -> None:
        live = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
        with live:
            print(f"\n[tests] {line.strip()}", file=sys.stderr, flush=True)

    return registry.fetch(SMOLLM2, log=log)


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf: Path) -> Path:
    """``smollm2_gguf``, and its float32 conversion for the torch backend in the cache in use,
    made here once: `specsplit` processes started together then do not each convert it."""
    from specsplit.backends.torch_backend import TorchBackend

    TorchBackend.load(SMOLLM2).close()
    return smollm2_gguf


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Every test file starts with PyTorch on one intra-op thread (a fixture that loads a real
    model with ``threads=N`` sets its own). The tiny models gain nothing from more, and on a
    shared CPU two spinning OpenMP threads lose a lot: the sampled-distribution tests of
    test_engine_exact took 588 s on two threads against 41 s on one, at the same load. It also
    keeps one file's thread setting from leaking into the next."""
    import torch

    torch.set_num_threads(1)


# ---- the default run fetches no model but SmolLM2 (the Qwen models are for slow tests) ----

_running: list[pytest.Item] = []  # the test being set up, run or torn down


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()


@pytest.fixture(scope="session", autouse=True)
def _qwen_only_in_slow_tests():
    """registry.fetch refuses the Qwen models in a test not marked slow (module fixtures
    included); `.ci/run` checks the same for subprocesses by what lands in its empty cache."""
    from specsplit import registry

    real = registry.fetch

    def fetch(name: str, *args, **kw):
        test = _running[-1] if _running else None
        big = name in registry.MODELS and registry.source_model(name) != SMOLLM2
        if big and test is not None and not test.get_closest_marker("slow"):
            pytest.fail(f"{test.nodeid} fetches {name}: mark it slow", pytrace=False)
        return real(name, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "fetch", fetch)
        yield


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


@contextlib.contextmanager
def ray_deployment(spec):  # noqa: ANN001, ANN201
    """A local Ray instance (2 CPUs, no dashboard, a small object store) running the cluster
    ``spec`` (a ``ClusterSpec``) on Serve; Serve and Ray shut down at the end."""
    import ray
    from ray import serve

    from specsplit.cluster import launch

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 << 20,
        runtime_env=spec.runtime_env(),
        log_to_driver=False,
    )
    try:
        launch.start_serve(spec)
        launch.deploy(spec)
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
