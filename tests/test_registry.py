"""The registry's hub attempt: quick and quiet where the hub is unreachable, taken where it
answers, skipped with HF_HUB_OFFLINE. Servers here are local; nothing is downloaded."""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from specsplit import registry

QWEN = registry.MODELS["qwen2.5-coder-0.5b"]  # a spec with a hub GGUF (nothing is fetched)


@pytest.fixture
def answering_hub(monkeypatch):
    """HF_ENDPOINT set to a loopback HTTP server that answers every request with 404."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def closed_hub(monkeypatch):
    """HF_ENDPOINT set to a loopback port held bound but not listening: connections are
    refused, and no other process can take the port meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield


@pytest.fixture
def fake_download(monkeypatch):
    """Replaces hf_hub_download: records its calls and whether huggingface_hub's retry
    warnings would print during them, then returns a file (or raises what ``fail`` holds)."""
    import huggingface_hub
    from huggingface_hub.utils import logging as hub_logging

    calls: list[tuple[str, str, bool]] = []
    fail: list[Exception] = []
    retry_log = hub_logging.get_logger("huggingface_hub.utils._http")  # logs each retry

    def download(repo, filename, local_dir, **kw):
        calls.append((repo, filename, retry_log.isEnabledFor(logging.WARNING)))
        if fail:
            raise fail[0]
        path = Path(local_dir) / filename
        path.write_bytes(b"GGUF")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls, fail


def test_unreachable_hub_is_skipped_at_once(closed_hub, fake_download, tmp_path):
    t0 = time.perf_counter()
    assert not registry.hub_reachable()
    assert registry._from_hub(QWEN, tmp_path) is None
    assert time.perf_counter() - t0 < 5.0  # huggingface_hub retrying would take ~30 s
    assert fake_download[0] == []  # huggingface_hub was never asked


def test_silent_hub_times_out(monkeypatch):
    """A hub that accepts the connection but never answers costs the probe's timeout only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        t0 = time.perf_counter()
        assert not registry.hub_reachable(timeout=0.5)
        assert time.perf_counter() - t0 < 3.0


def test_answering_hub_is_used_and_its_warnings_are_not_printed(
    answering_hub, fake_download, tmp_path
):
    calls, fail = fake_download
    level = logging.getLogger("huggingface_hub").level
    assert registry.hub_reachable()
    got = registry._from_hub(QWEN, tmp_path)
    assert got == tmp_path / QWEN.hub_gguf[1]
    assert calls == [(*QWEN.hub_gguf, False)]  # called, with its retry warnings off
    fail.append(OSError("connection reset"))
    assert registry._from_hub(QWEN, tmp_path) is None  # falls through to the package index
    assert len(calls) == 2
    assert logging.getLogger("huggingface_hub").level == level  # restored


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes"])
def test_hf_hub_offline_is_honoured(value, answering_hub, fake_download, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert registry.hub_offline()
    assert registry._from_hub(QWEN, tmp_path) is None
    assert fake_download[0] == []


def test_models_without_a_hub_gguf_skip_the_hub(answering_hub, fake_download, tmp_path):
    assert registry._from_hub(registry.MODELS["smollm2-135m"], tmp_path) is None
    assert fake_download[0] == []
