"""An OpenAI-style HTTP face over a generate function, with the standard library only.

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``,
``POST /v1/completions`` and ``POST /v1/chat/completions`` (with ``"stream": true`` as
server-sent events). Non-streamed responses keep the connection alive (Content-Length);
a stream is sent without a length and ends by closing the connection, so ``http.client``
and ``curl -N`` read it as is. Errors are OpenAI-shaped JSON with a one-line message.

Extensions to the OpenAI fields: ``top_k``, ``min_p`` and a ``"specsplit"`` object with the
generation statistics (acceptance rate, tokens/s, ...) next to ``usage``.

Generations run one at a time by default (``concurrency=1``): ``SpeculativeEngine`` serves
one request at a time. Pass ``concurrency=None`` for a generate function that is thread-safe.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from specsplit.backends.base import Tokenizer
from specsplit.engine.speculative import Chunk, GenerationRequest, GenerationResult
from specsplit.errors import SpecsplitError
from specsplit.sampling import SamplingParams

GenerateFn = Callable[[GenerationRequest], Iterator[Chunk]]

logger = logging.getLogger("specsplit.http")

MAX_BODY = 1 << 20  # bytes; larger request bodies get 413
MAX_STOP = 4  # stop strings per request, as in the OpenAI API
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
_DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
# OpenAI fields this face does not implement, with the values that mean "off"
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "tools": (None, []),
}


# ---- errors ----


@dataclass(eq=False)
class HTTPError(Exception):
    """An error response: status code and the OpenAI error object's fields."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        """The JSON error body; the message is kept to one line."""
        message = " ".join(str(self.message).split()) or "error"
        return {
            "error": {"message": message, "type": self.type, "param": self.param, "code": self.code}
        }


def _bad(message: str, param: str | None = None, code: str | None = None) -> HTTPError:
    return HTTPError(400, message, param=param, code=code)


class _ClientGone(Exception):
    """The client closed the connection."""


# ---- request fields ----


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_field(body: dict, name: str, default: int | None) -> int | None:
    """An optional integer field (null means the default)."""
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise _bad(f"{name} must be an integer, got {json.dumps(v)[:40]}", name)
    return v


def _float_field(body: dict, name: str, default: float) -> float:
    """An optional number field (null means the default)."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _bad(f"{name} must be a number, got {json.dumps(v)[:40]}", name)
    return float(v)


def _bool_field(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"{name} must be true or false", name)
    return v


def _stop_field(body: dict) -> tuple[str, ...]:
    """``stop``: a string or a list of up to four strings."""
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise _bad(f"stop holds at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return tuple(s for s in stops if s)


def _check_unsupported(body: dict) -> None:
    for name, off in _UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise _bad(f"{name} is not supported by this server", name, "unsupported")


def _sampling(body: dict) -> SamplingParams:
    """Temperature (default 1, as in OpenAI), top_p, and the extensions top_k and min_p."""
    top_k = _int_field(body, "top_k", 0)
    try:
        return SamplingParams(
            temperature=_float_field(body, "temperature", 1.0),
            top_k=0 if top_k == -1 else top_k,  # -1 = off, as in vLLM
            top_p=_float_field(body, "top_p", 1.0),
            min_p=_float_field(body, "min_p", 0.0),
        )
    except SpecsplitError as e:
        raise _bad(str(e)) from e


def _max_tokens(body: dict, names: tuple[str, ...], default: int, limit: int) -> int:
    """The first of ``names`` that is set, in [1, limit]."""
    name, value = names[0], default
    for n in names:
        if body.get(n) is not None:
            name, value = n, _int_field(body, n, default)
            break
    if not 1 <= value <= limit:
        raise _bad(f"{name} must be in [1, {limit}], got {value}", name)
    return value


def _prompt_ids(body: dict, tokenizer: Tokenizer) -> list[int]:
    """``prompt``: text (encoded with special tokens) or a list of token ids."""
    p = body.get("prompt")
    if isinstance(p, str):
        return tokenizer.encode(p, add_special=True)
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        v = tokenizer.vocab_size
        if min(p) < 0 or max(p) >= v:
            raise _bad(f"prompt token ids must be in [0, {v})", "prompt")
        return list(p)
    raise _bad("prompt must be a string or a non-empty list of token ids", "prompt")


def _content_text(content: Any, i: int) -> str:
    """A message's content: a string, null, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
        for c in content
    ):
        return "".join(c["text"] for c in content)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _messages(body: dict) -> list[dict[str, str]]:
    """``messages``: a non-empty list of {role, content}."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise _bad(f"messages[{i}] must be an object with a string role", "messages")
        out.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
    return out


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Messages -> prompt ids: the model's chat template (which holds its own special
    tokens), or else plain ``role: content`` lines ending with ``assistant:``.

    Raises HTTPError (400) if the template rejects the messages.
    """
    try:
        rendered = tokenizer.apply_chat_template(messages)
    except Exception as e:  # a template rejecting the messages (roles, order) is the client's
        raise _bad(f"the chat template rejected the messages: {e}", "messages") from e
    if rendered is not None:
        return tokenizer.encode(rendered, add_special=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer.encode(text, add_special=True)


# ---- response bodies ----


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class _Reply:
    """Builds the response objects of one completion or chat completion."""

    chat: bool
    model: str
    prompt_tokens: int

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.role_sent = False

    def _envelope(self, obj: str, choice: dict) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def _extras(self, result: GenerationResult) -> dict:
        return {
            "usage": _usage(self.prompt_tokens, len(result.token_ids)),
            "specsplit": result.stats.as_dict(),
        }

    def full(self, result: GenerationResult) -> dict:
        """The whole (non-streamed) response."""
        finish = FINISH_REASONS.get(result.finish_reason, result.finish_reason)
        if self.chat:
            message = {"role": "assistant", "content": result.text}
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            return self._envelope("chat.completion", choice) | self._extras(result)
        choice = {"index": 0, "text": result.text, "finish_reason": finish, "logprobs": None}
        return self._envelope("text_completion", choice) | self._extras(result)

    def piece(self, text: str, finish: str | None = None) -> dict:
        """One streamed event: new text (and the finish reason on the last one)."""
        if not self.chat:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return self._envelope("text_completion", choice)
        delta: dict[str, str] = {} if self.role_sent else {"role": "assistant"}
        self.role_sent = True
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return self._envelope("chat.completion.chunk", choice)

    def last(self, result: GenerationResult) -> dict:
        """The final streamed event: finish reason, usage and statistics."""
        finish = FINISH_REASONS.get(result.finish_reason, result.finish_reason)
        return self.piece("", finish) | self._extras(result)


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _close(it: Iterator[Chunk]) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


# ---- the server ----


class HTTPFace:
    """An OpenAI-style HTTP server in front of a generate function (e.g. ``engine.stream``)."""

    def __init__(
        self,
        generate: GenerateFn,
        tokenizer: Tokenizer,
        model_name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        auth_token: str | None = None,
        max_tokens_limit: int = 4096,
        n_ctx: int = 4096,
        metrics: Callable[[], str] | None = None,
        health: Callable[[], dict] | None = None,
        concurrency: int | None = 1,
    ) -> None:
        """``port=0`` binds an ephemeral port (read ``port`` after ``start``). With
        ``auth_token`` every path except ``/health`` needs ``Authorization: Bearer <token>``.
        ``concurrency`` bounds simultaneous generations (None: no bound)."""
        self.generate = generate
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.host, self.port = host, port
        self.auth_token = auth_token
        self.max_tokens_limit = max_tokens_limit
        self.n_ctx = n_ctx
        self.metrics = metrics
        self.health = health
        self.created = int(time.time())
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 or None, got {concurrency}")
        self.slots = threading.BoundedSemaphore(concurrency) if concurrency else None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8000``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("the HTTP face is already running")
        handler = type("Handler", (_Handler,), {"face": self})
        server_cls = _Server6 if ":" in self.host else _Server
        self._server = server_cls((self.host, self.port), handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"specsplit-http:{self.port}", daemon=True
        )
        self._thread.start()
        logger.info("serving %s on %s", self.model_name, self.url)

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HTTPFace:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def slot(self) -> contextlib.AbstractContextManager:
        """Hold one generation slot."""
        return self.slots if self.slots is not None else contextlib.nullcontext()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client hanging up is routine; anything else is logged with its traceback."""
        if isinstance(sys.exc_info()[1], _DISCONNECTED):
            logger.debug("client %s disconnected", client_address)
            return
        logger.exception("error serving %s", client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


_ROUTES = {
    "/health": ("GET", "_get_health"),
    "/metrics": ("GET", "_get_metrics"),
    "/v1/models": ("GET", "_get_models"),
    "/v1/completions": ("POST", "_post_completions"),
    "/v1/chat/completions": ("POST", "_post_chat"),
}


class _Handler(BaseHTTPRequestHandler):
    """One connection; each request goes through ``_dispatch``."""

    face: HTTPFace  # set on the subclass made by HTTPFace.start
    protocol_version = "HTTP/1.1"
    server_version = "specsplit"
    sys_version = ""
    timeout = 120  # seconds a socket read or write may block

    def version_string(self) -> str:
        """The Server header: no Python version."""
        return self.server_version

    # ---- entry points ----

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch()

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        """Route, answer, and log one line about the request."""
        self._t0 = time.perf_counter()
        self._status, self._tokens, self._gone = 0, (0, 0), False
        length = self.headers.get("Content-Length", "").strip()
        self._body_pending = length not in ("", "0") or bool(self.headers.get("Transfer-Encoding"))
        path = urlsplit(self.path).path
        try:
            self._route(path)
        except HTTPError as e:
            self._send_json(e.status, e.body(), e)
        except (_ClientGone, *_DISCONNECTED):
            self._gone, self.close_connection = True, True
        except Exception:
            logger.exception("internal error on %s %s", self.command, path)
            err = HTTPError(500, "internal error", "server_error")
            with contextlib.suppress(*_DISCONNECTED):
                self._send_json(500, err.body())
        finally:
            self._log(path)

    def _route(self, path: str) -> None:
        if path != "/health":
            self._check_auth()
        method, name = _ROUTES.get(path, (None, None))
        if name is None or (path == "/metrics" and self.face.metrics is None):
            raise HTTPError(404, f"unknown path {path}", code="not_found")
        if self.command != method:
            err = HTTPError(405, f"{path} accepts {method} only", code="method_not_allowed")
            self._send_json(405, err.body(), extra={"Allow": method})
            return
        getattr(self, name)()

    def _check_auth(self) -> None:
        token = self.face.auth_token
        if token is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        )
        if not ok:
            raise HTTPError(
                401,
                "missing or invalid bearer token",
                "authentication_error",
                code="invalid_api_key",
            )

    # ---- I/O ----

    def _read_json(self) -> dict:
        """The request body as a JSON object (at most 1 MiB)."""
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
        raw = (self.headers.get("Content-Length") or "").strip()
        if not raw:
            raise HTTPError(411, "Content-Length is required")
        if not re.fullmatch(r"[0-9]{1,19}", raw):
            raise _bad(f"invalid Content-Length {raw[:20]!r}")
        n = int(raw)
        if n > MAX_BODY:
            raise HTTPError(413, f"request body is {n} bytes; the limit is {MAX_BODY}")
        data = self.rfile.read(n)
        if len(data) < n:
            raise _ClientGone
        self._body_pending = False
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise _bad(f"invalid JSON body: {e}") from e
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    def _send(self, status: int, ctype: str, data: bytes, extra: dict | None = None) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self._body_pending:  # an unread body would be taken for the next request
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(
        self, status: int, obj: dict, err: HTTPError | None = None, extra: dict | None = None
    ) -> None:
        headers = dict(extra or {})
        if err is not None and err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        self._send(status, "application/json", json.dumps(obj).encode(), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors from the stdlib parser (bad request line, ...) as JSON."""
        self.close_connection = True
        self._body_pending = True
        kind = "server_error" if code >= 500 else "invalid_request_error"
        err = HTTPError(code, message or explain or "bad request", kind)
        with contextlib.suppress(*_DISCONNECTED):
            self._send_json(code, err.body())

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        logger.debug("%s " + format, self.address_string(), *args)

    def _log(self, path: str) -> None:
        prompt, completion = self._tokens
        seconds = time.perf_counter() - self._t0
        fields = {
            "method": self.command,
            "path": path,
            "status": self._status,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "seconds": round(seconds, 4),
        }
        line = " ".join(f"{k}={v}" for k, v in fields.items())
        if self._gone:
            line += " client_disconnected=true"
        logger.info(line, extra={"http": fields})

    # ---- GET ----

    def _get_health(self) -> None:
        extra = self.face.health() if self.face.health is not None else {}
        self._send_json(200, {"status": "ok", **extra})

    def _get_metrics(self) -> None:
        text = self.face.metrics() if self.face.metrics is not None else ""
        self._send(200, PROMETHEUS_TYPE, text.encode())

    def _get_models(self) -> None:
        model = {
            "id": self.face.model_name,
            "object": "model",
            "created": self.face.created,
            "owned_by": "specsplit",
        }
        self._send_json(200, {"object": "list", "data": [model]})

    # ---- POST ----

    def _post_completions(self) -> None:
        body = self._read_json()
        _check_unsupported(body)
        ids = _prompt_ids(body, self.face.tokenizer)
        req = self._request(body, ids, ("max_tokens",), 16)
        self._generate(req, _Reply(False, self.face.model_name, len(ids)), body)

    def _post_chat(self) -> None:
        body = self._read_json()
        _check_unsupported(body)
        ids = chat_prompt_ids(self.face.tokenizer, _messages(body))
        limit = self.face.max_tokens_limit
        req = self._request(body, ids, ("max_completion_tokens", "max_tokens"), limit)
        self._generate(req, _Reply(True, self.face.model_name, len(ids)), body)

    def _request(
        self, body: dict, ids: list[int], max_names: tuple[str, ...], default_max: int
    ) -> GenerationRequest:
        """Validate the shared fields and build the engine request."""
        if not ids:
            raise _bad("the prompt is empty", "prompt")
        if len(ids) >= self.face.n_ctx:
            raise _bad(
                f"the prompt has {len(ids)} tokens; the context holds {self.face.n_ctx}",
                "prompt",
                "context_length_exceeded",
            )
        self._tokens = (len(ids), 0)
        max_tokens = _max_tokens(body, max_names, default_max, self.face.max_tokens_limit)
        if _int_field(body, "n", 1) != 1:
            raise _bad("only n=1 is supported", "n")
        seed = _int_field(body, "seed", None)
        if seed is not None and seed < 0:
            raise _bad(f"seed must be >= 0, got {seed}", "seed")
        params = _sampling(body)
        return GenerationRequest(ids, max_tokens, params, seed, _stop_field(body))

    def _generate(self, req: GenerationRequest, reply: _Reply, body: dict) -> None:
        """Run the request in a generation slot; answer whole or as a stream."""
        stream = _bool_field(body, "stream")
        with self.face.slot():
            it, first = self._first_chunk(req)
            try:
                if stream:
                    self._stream(it, first, reply)
                else:
                    result = self._finish(it, first)
                    self._tokens = (reply.prompt_tokens, len(result.token_ids))
                    self._send_json(200, reply.full(result))
            finally:
                _close(it)

    def _first_chunk(self, req: GenerationRequest) -> tuple[Iterator[Chunk], Chunk]:
        """Start the generation; its request checks raise here, before any header is sent."""
        try:
            it = iter(self.face.generate(req))
        except SpecsplitError as e:
            raise _bad(str(e)) from e
        try:
            return it, next(it)
        except StopIteration:
            _close(it)
            raise RuntimeError("the generator ended without a result") from None
        except SpecsplitError as e:
            _close(it)
            raise _bad(str(e)) from e
        except BaseException:
            _close(it)
            raise

    @staticmethod
    def _finish(it: Iterator[Chunk], first: Chunk) -> GenerationResult:
        """Drain the chunks; the last one carries the result."""
        chunk = first
        try:
            while chunk.result is None:
                chunk = next(it)
        except StopIteration:
            raise RuntimeError("the generator ended without a result") from None
        except SpecsplitError as e:
            raise _bad(str(e)) from e
        return chunk.result

    def _stream(self, it: Iterator[Chunk], first: Chunk, reply: _Reply) -> None:
        """Server-sent events: one per text piece, a final one with usage, then [DONE]."""
        self._status = 200
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self._events(it, first, reply)
        except _DISCONNECTED:
            self._gone = True
            _close(it)  # frees the engine's sequence now, not when the generator is collected

    def _events(self, it: Iterator[Chunk], first: Chunk, reply: _Reply) -> None:
        chunk: Chunk | None = first
        n_ids = 0
        try:
            while chunk is not None:
                n_ids += len(chunk.token_ids)
                self._tokens = (reply.prompt_tokens, n_ids)
                if chunk.text:
                    self.wfile.write(_sse(reply.piece(chunk.text)))
                if chunk.result is not None:
                    self._tokens = (reply.prompt_tokens, len(chunk.result.token_ids))
                    self.wfile.write(_sse(reply.last(chunk.result)))
                    break
                chunk = next(it, None)
            else:
                raise RuntimeError("the generator ended without a result")
        except _DISCONNECTED:
            raise
        except SpecsplitError as e:
            self.wfile.write(_sse(_bad(str(e)).body()))
        except Exception:
            logger.exception("internal error while streaming")
            self.wfile.write(_sse(HTTPError(500, "internal error", "server_error").body()))
        self.wfile.write(_sse("[DONE]"))
        self.wfile.flush()
