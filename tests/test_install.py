"""An edge-only install: the base package (no extras) in a fresh virtual environment drafts
for a server, with n-grams and with a llama.cpp draft model, and imports no torch,
transformers or server stack."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "gguf", "fastapi", "uvicorn", "ray", "accelerate")

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while "specsplit serving" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.3)


# run the CLI in the venv, then report which heavy packages the process imported
PROBE = f"""
import json, sys
from specsplit.faces.cli import main
rc = main(sys.argv[1:])
print(json.dumps({{"rc": rc, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


@pytest.fixture(scope="module")
def edge_python(tmp_path_factory, smollm2_gguf) -> Path:
    """A new virtual environment with `pip install specsplit` (the base install only); the
    llama-cpp-python wheel comes from build/wheels/<variant>, where `make setup` built it."""
    variant = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "llama_cpu.py"), "variant"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    wheels = ROOT / "build" / "wheels" / variant
    if not list(wheels.glob("llama_cpp_python-0.3.36-*.whl")):
        pytest.fail(f"no llama-cpp-python wheel in {wheels}: run `make setup` first")
    env_dir = tmp_path_factory.mktemp("edge-venv")
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--find-links", str(wheels),
         "--only-binary", "llama-cpp-python", str(ROOT)],
        check=True, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"torch", "transformers", "fastapi", "ray"}, names
    return py


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    """`specsplit serve` with the SmolLM2 target on llama.cpp, from the full install."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "specsplit.faces.cli", "serve", "--target", "smollm2-135m",
             "--target-backend", "llama.cpp", "--threads", "1", "--port", str(port)],
            stdout=f, stderr=f, cwd=ROOT,
        )  # fmt: skip
    try:
        wait_for_server(proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.mark.parametrize("draft", ["ngram", "smollm2-135m"])
def test_edge_only_install_drafts_for_a_server(draft, edge_python, server, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the venv's code
    t0 = time.time()
    r = subprocess.run(
        [str(edge_python), "-c", PROBE, "generate", "Name three colours.", "--server", server,
         "--draft", draft, "--k", "3", "--max-new-tokens", "16", "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    probe, record = json.loads(lines[-1]), json.loads(lines[-2])
    assert probe == {"rc": 0, "heavy": []}
    assert len(record["token_ids"]) == 16 and record["text"]
    assert record["round_trips"] > 0
    assert time.time() - t0 < 120
