"""`specsplit serve` tunes glibc's malloc at start: few arenas, and freed heap pages given
back every second (``malloc_trim``): KV caches that grow round by round leave blocks
that are rarely reused whole, which glibc would otherwise keep resident."""

from __future__ import annotations

import sys
import time

import pytest

from specsplit.faces import serve


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.trims = 0

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_serve_caps_arenas_and_trims(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    libc = _Libc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(serve, "_trimmer", None)
    serve._tune_malloc(trim_every=0.01)
    assert libc.calls == [(-8, 2)]  # M_ARENA_MAX; glibc's own mmap threshold kept
    deadline = time.monotonic() + 10
    while libc.trims < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert libc.trims >= 2
    first = serve._trimmer
    serve._tune_malloc(trim_every=0.01)  # (a second call: still one trimming thread)
    assert serve._trimmer is first


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_trimming_returns_freed_blocks() -> None:
    """In a fresh process: large blocks that grow and are freed (as KV caches do round by
    round), small ones pinning the heap between them: resident memory grows by their sum
    until the trimming thread gives the free pages back."""
    import subprocess

    code = (
        "import time, numpy as np\n"
        "from specsplit.faces import serve\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "def grow(keep):\n"
        "    for step in range(400):\n"
        "        a = np.ones((step % 40 + 1) * 32768)\n"  # 256 KiB .. 10 MiB
        "        keep.append(np.ones(1000))\n"  # small blocks between them pin the heap
        "        del a\n"
        "keep = []\n"
        "r0 = rss()\n"
        "grow(keep)\n"
        "held = rss() - r0\n"
        "serve._tune_malloc(trim_every=0.05)\n"
        "time.sleep(0.5)\n"
        "print(held, rss() - r0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    held, after = (int(x) for x in out.stdout.split())
    assert held > 12 << 20  # without trimming the heap keeps them (the test can fail)
    assert after < 8 << 20
