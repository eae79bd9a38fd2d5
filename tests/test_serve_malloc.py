"""`specsplit serve` tunes glibc's malloc at start: few arenas, and a fixed mmap threshold
(glibc's dynamic one let the soak's active sessions grow resident memory past weights + KV
budget + overhead: freed KV caches stayed in the heap)."""

from __future__ import annotations

import sys

import pytest

from specsplit.faces import serve


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_serve_fixes_the_mmap_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    libc = _Libc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    serve._tune_malloc()
    assert (-8, 2) in libc.calls  # M_ARENA_MAX
    assert (-3, 128 << 10) in libc.calls  # M_MMAP_THRESHOLD: fixed, so never raised


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_fixed_mmap_threshold_returns_freed_blocks() -> None:
    """In a fresh process: after the call, large blocks that grow and are freed (as KV
    caches do round by round) give their memory back."""
    import subprocess

    code = (
        "import ctypes, numpy as np\n"
        "from specsplit.faces import serve\n"
        "serve._tune_malloc()\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "keep = []\n"
        "r0 = rss()\n"
        "for step in range(400):\n"
        "    a = np.ones((step % 40 + 1) * 32768)\n"  # 256 KiB .. 10 MiB, as a cache that grows
        "    keep.append(np.ones(1000))\n"  # small blocks between them pin the heap
        "    del a\n"
        "print(rss() - r0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) < 8 << 20
