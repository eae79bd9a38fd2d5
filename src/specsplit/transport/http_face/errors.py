"""Errors as OpenAI sends them: a status and ``{"error": {message, type, param, code}}``.

Every error the face answers goes through here, whether raised by a route (``APIError``),
by Starlette's routing (404, 405), by request validation or by an unexpected bug (500,
logged with its traceback); the message is always one line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from specsplit.errors import ConfigError, Overloaded, SpecsplitError

log = logging.getLogger("specsplit.http")

_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}
_CODES = {404: "not_found", 405: "method_not_allowed", 408: "timeout", 413: "body_too_large"}


@dataclass(eq=False)
class APIError(Exception):
    """An error response: the status and the OpenAI error object's fields."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def body(self) -> dict:
        """The JSON error body; the message kept to one line."""
        message = " ".join(str(self.message).split()) or "error"
        return {
            "error": {"message": message, "type": self.type, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        headers = dict(self.headers or {})
        if self.status == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return JSONResponse(self.body(), self.status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def from_engine(e: SpecsplitError) -> APIError:
    """An engine error as a response: bad settings are the client's (400); limits reached
    (sessions, KV memory) and lost sessions are the server's state now (503, retry)."""
    if isinstance(e, ConfigError):
        return bad(str(e))
    if isinstance(e, Overloaded):
        return APIError(503, str(e), "server_error", code="overloaded")
    return APIError(503, str(e), "server_error", code="unavailable")


def internal() -> APIError:
    return APIError(500, "internal error", "server_error")


def from_validation(err: ValidationError | RequestValidationError) -> APIError:
    """A schema violation: 400 naming the top-level field (``param``) and where inside it."""
    first = err.errors()[0]
    loc = [p for p in first.get("loc", ()) if p != "body" and not _union_member(p)]
    param = str(loc[0]) if loc and isinstance(loc[0], str) else None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind, msg = first.get("type"), first.get("msg", "invalid value")
    if kind == "extra_forbidden":
        msg = "is not a field this server accepts"
    elif kind == "value_error":
        msg = str(first.get("ctx", {}).get("error", msg))
    elif kind != "missing" and "input" in first:
        msg += f", got {json.dumps(first['input'], default=str)[:40]}"
    return bad(f"{where}: {msg}" if where else msg, param)


def _union_member(part: object) -> bool:
    """A location part naming which type of a union failed ("str", "list[TextPart]")."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def install(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        kind = "server_error" if e.status_code >= 500 else _TYPES.get(e.status_code)
        err = APIError(
            e.status_code,
            str(e.detail),
            kind or "invalid_request_error",
            code=_CODES.get(e.status_code),
            headers=dict(e.headers or {}),
        )
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return from_validation(e).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return internal().response()
