"""Two ASGI middlewares: the request body's size and deadline, and one log line per request.

``BodyGuard`` reads a request's whole body before the app sees it: a declared length over
the limit is refused (413) without reading; a body that grows past it too; a body that has
not arrived whole within the deadline (a Content-Length larger than what is sent, bytes
trickled) gets 408, so a slow client cannot hold a worker for as long as it likes. Both
close the connection. The app then reads the body from memory.

``AccessLog`` writes one ``key=value`` line per request (logger ``specsplit.http``):
method, path, status, prompt and completion tokens, seconds, and whether the client left;
at INFO for the API (``/v1/...``) and every error, at DEBUG for the rest (the page polls
``/status`` every second).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specsplit.transport.http_face.errors import APIError

log = logging.getLogger("specsplit.http")


def log_fields(scope: Scope) -> dict[str, Any]:
    """The request's log fields that routes fill in (tokens, client gone)."""
    return scope.setdefault("state", {}).setdefault("log", {})


class BodyGuard:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"").strip()
        if not length and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        if length and (not length.isdigit() or int(length) > self.max_bytes):
            err = f"Content-Length {length[:20].decode(errors='replace')}: the limit is {self.max_bytes} bytes"
            await _refuse(413 if length.isdigit() else 400, err, scope, receive, send)
            return
        body: bytes | None = None
        try:
            with anyio.move_on_after(self.timeout):
                body = await self._read(receive)
        except _Gone:
            return  # nobody to answer
        if body is None:
            msg = f"the request body did not arrive whole within {self.timeout:g} s"
            await _refuse(408, msg, scope, receive, send)
        elif len(body) > self.max_bytes:
            msg = f"the request body is over the limit of {self.max_bytes} bytes"
            await _refuse(413, msg, scope, receive, send)
        else:
            await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes:
        """The whole body; stops early once over the limit (the caller refuses it)."""
        body = bytearray()
        while len(body) <= self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        return bytes(body)


class _Gone(Exception):
    """The client left while sending its body."""


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then waits for the disconnect."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send) -> None:
    """An error that closes the connection (the rest of the body is never read)."""
    code = {408: "timeout", 413: "body_too_large"}.get(status)
    err = APIError(status, message, code=code, headers={"Connection": "close"})
    await err.response()(scope, receive, send)


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        fields = log_fields(scope)
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            line = {
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "prompt_tokens": fields.get("prompt_tokens", 0),
                "completion_tokens": fields.get("completion_tokens", 0),
                "seconds": round(time.perf_counter() - t0, 4),
            }
            text = " ".join(f"{k}={v}" for k, v in line.items())
            if fields.get("client_disconnected"):
                text += " client_disconnected=true"
            api = scope["path"].startswith("/v1/") or status >= 400
            log.log(logging.INFO if api else logging.DEBUG, text, extra={"http": line})
