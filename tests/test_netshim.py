"""The delaying proxy used by the split benchmarks: it delays and counts what it forwards."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from specsplit.faces.serve import parse_size
from specsplit.transport.netshim import DelayProxy


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_proxy_adds_the_round_trip_and_counts_bytes():
    srv, port = _echo_server()
    proxy = DelayProxy(("127.0.0.1", port), one_way=0.05).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            t0 = time.perf_counter()
            c.sendall(b"x" * 100)
            got = b""
            while len(got) < 100:
                got += c.recv(4096)
            rtt = time.perf_counter() - t0
        assert got == b"x" * 100
        assert 0.1 <= rtt < 0.5  # two one-way delays of 50 ms
        assert proxy.bytes_up == 100 and proxy.bytes_down == 100
    finally:
        proxy.stop()
        srv.close()


@pytest.mark.parametrize(
    "text,expected",
    [("256MiB", 256 << 20), ("2GB", 2_000_000_000), ("1.5G", 1_500_000_000), ("4096", 4096)],
)
def test_kv_budget_sizes(text, expected):
    assert parse_size(text) == expected


def test_kv_budget_size_errors():
    from specsplit.errors import ConfigError

    with pytest.raises(ConfigError, match="like 512MiB"):
        parse_size("lots")


def test_stopping_with_a_connection_open_logs_nothing(caplog):
    """Stopping the proxy under an open connection ends it quietly (no asyncio error logged
    about a cancelled handler, as a benchmark's end printed before)."""
    srv, port = _echo_server()
    proxy = DelayProxy(("127.0.0.1", port), one_way=0.01).start()
    with (
        caplog.at_level("ERROR", logger="asyncio"),
        socket.create_connection(("127.0.0.1", proxy.port)) as c,
    ):
        c.sendall(b"hello")
        assert c.recv(5) == b"hello"
        proxy.stop()
        time.sleep(0.2)
    srv.close()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
