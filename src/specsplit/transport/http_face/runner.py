"""``HTTPFace``: an ASGI app served by uvicorn in a background thread (start / stop).

The socket is bound in ``start`` (so a taken port fails there, and port 0 picks a free
one that ``port`` then holds); uvicorn's own logging setup and access log are off (the
app logs one line per request itself).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp

log = logging.getLogger("specsplit.http")


class HTTPFace:
    """Serves an ASGI app (``create_app(...)``) on host:port until ``stop``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keep_alive: float = 5.0,
        grace: float = 5.0,
    ) -> None:
        """``keep_alive``: seconds an idle connection stays open; ``grace``: seconds that
        requests in flight get at ``stop`` before they are cancelled."""
        self.app, self.host, self.port = app, host, port
        self.keep_alive, self.grace = keep_alive, grace
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8000``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind, then serve in a daemon thread; returns once the server accepts."""
        if self._server is not None:
            raise RuntimeError("the HTTP face is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=self.keep_alive,
            timeout_graceful_shutdown=self.grace,
        )
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"specsplit-http:{self.port}",
            daemon=True,
        )
        self._thread.start()
        while not server.started and self._thread.is_alive():
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError(f"the HTTP face did not start on {self.url}")
        log.info("serving HTTP on %s", self.url)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, give requests in flight ``grace`` seconds (default: the one given
        at construction), then cancel them, which frees their sessions (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        if grace is not None:  # (uvicorn cancels at once, and says so, below ~0.05 s)
            server.config.timeout_graceful_shutdown = max(grace, 0.05)
        server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=server.config.timeout_graceful_shutdown + 5)

    def __enter__(self) -> HTTPFace:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
