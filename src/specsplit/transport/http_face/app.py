"""``create_app``: the OpenAI-style face as an ASGI app (FastAPI), whoever serves it.

Endpoints: ``GET /health``; ``GET /metrics`` (Prometheus, given a registry); ``GET /status``
(JSON for the page, given a status function); ``GET /v1/models``; ``POST /v1/completions``
and ``POST /v1/chat/completions`` (``"stream": true`` for server-sent events); ``GET /``
the page that shows speculation at work (its files under ``/page/``). With API keys (or one
auth token) every path except ``/health`` and the page needs ``Authorization: Bearer <key>``;
a key's rate and token quota are answered with 429 (``transport.keys``).

The app converts HTTP to a ``GenerationRequest`` and hands it to the generate function; it
holds no decoding logic. ``HTTPFace`` (``runner``) serves it with uvicorn in a thread; Ray
Serve can mount the same app as an ingress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib.resources import files

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from specsplit.backends.base import Tokenizer
from specsplit.transport.http_face import convert, errors
from specsplit.transport.http_face.config import FaceConfig
from specsplit.transport.http_face.errors import APIError
from specsplit.transport.http_face.generation import (
    ClientGone,
    GenerateFn,
    Generation,
    until_disconnect,
)
from specsplit.transport.http_face.middleware import AccessLog, BodyGuard, log_fields
from specsplit.transport.http_face.requests import ChatCompletionRequest, CompletionRequest
from specsplit.transport.http_face.responses import ModelCard, ModelList, Reply
from specsplit.transport.http_face.spans import TokenSpans
from specsplit.transport.http_face.streaming import Encoder, EventStream, events
from specsplit.transport.keys import Keys, Principal, QuotaExceeded, RateLimited

PAGE = files("specsplit.transport.http_face") / "page"


def create_app(
    generate: GenerateFn,
    tokenizer: Tokenizer,
    model_name: str,
    config: FaceConfig | None = None,
    *,
    registry: CollectorRegistry | None = None,
    health: Callable[[], dict] | None = None,
    status: Callable[[], dict] | None = None,
    keys: Keys | None = None,
) -> FastAPI:
    """The app for one served model (``model_name``, what ``/v1/models`` lists and requests
    must name). ``generate`` may block; each of its steps runs in a worker thread. ``keys``:
    who may call and how much (the server's, shared with gRPC); else ``config.auth_token``
    as one key, or anyone."""
    config = config or FaceConfig()
    if keys is None:
        keys = Keys.single(config.auth_token, None) if config.auth_token else Keys.open(None)
    app = FastAPI(title="specsplit", docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    app.add_middleware(BodyGuard, max_bytes=config.max_body_bytes, timeout=config.body_timeout)
    app.add_middleware(AccessLog)
    face = _Face(generate, tokenizer, model_name, config, keys)
    open_routes, routes = APIRouter(), APIRouter(dependencies=[Depends(face.check_auth)])

    @open_routes.get("/health")
    async def get_health() -> dict:
        return {"status": "ok", **(health() if health is not None else {})}

    @routes.get("/v1/models")
    async def get_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=face.created)])

    @routes.post("/v1/completions")
    async def post_completions(request: Request) -> Response:
        return await face.answer(request, CompletionRequest)

    @routes.post("/v1/chat/completions")
    async def post_chat(request: Request) -> Response:
        return await face.answer(request, ChatCompletionRequest)

    if registry is not None:

        @routes.get("/metrics")
        async def get_metrics(request: Request) -> Response:
            encode, content_type = choose_encoder(request.headers.get("accept", ""))
            data = await anyio.to_thread.run_sync(encode, registry)
            return Response(data, media_type=content_type)

    if status is not None:

        @routes.get("/status")
        async def get_status() -> dict:
            return status()

    @open_routes.get("/")
    async def get_page() -> FileResponse:
        return FileResponse(PAGE / "index.html")

    app.include_router(open_routes)
    app.include_router(routes)
    app.mount("/page", StaticFiles(directory=str(PAGE)), name="page")
    return app


class _Face:
    """The state the routes share: the model, limits and the worker threads."""

    def __init__(
        self,
        generate: GenerateFn,
        tokenizer: Tokenizer,
        model_name: str,
        config: FaceConfig,
        keys: Keys,
    ) -> None:
        self.generate, self.tokenizer = generate, tokenizer
        self.model_name, self.config, self.keys = model_name, config, keys
        self.created = int(time.time())
        self.limiter = anyio.CapacityLimiter(config.threads)
        self.slots = anyio.Semaphore(config.concurrency) if config.concurrency else None

    async def check_auth(self, request: Request) -> None:
        """Who the request is from (``request.state.principal``); 401 for a missing or
        unknown key where keys are required."""
        auth = request.headers.get("authorization", "")
        if self.keys.required and self.keys.check(auth) is None:
            raise APIError(
                401,
                "missing or invalid bearer token",
                "authentication_error",
                code="invalid_api_key",
            )
        address = request.client.host if request.client else "unknown"
        request.state.principal = self.keys.principal(auth, address)

    async def answer(
        self, request: Request, schema: type[CompletionRequest] | type[ChatCompletionRequest]
    ) -> Response:
        """Validate, convert, generate; the whole answer or a stream of events."""
        principal: Principal = request.state.principal
        try:
            principal.admit()
        except QuotaExceeded as e:
            raise APIError(429, str(e), "insufficient_quota", code="insufficient_quota") from None
        except RateLimited as e:
            raise APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded") from None
        raw = await request.body()
        body = await anyio.to_thread.run_sync(convert.parse, raw, schema)
        convert.check_model(body.model, self.model_name)
        ids_of = (
            convert.chat_ids if isinstance(body, ChatCompletionRequest) else convert.completion_ids
        )
        ids = await anyio.to_thread.run_sync(ids_of, body, self.tokenizer)
        req = convert.generation_request(body, ids, self.config)
        fields = log_fields(request.scope)
        fields["prompt_tokens"] = len(ids)
        reply = Reply(isinstance(body, ChatCompletionRequest), self.model_name, len(ids))
        gen = Generation(self.generate, req, self.limiter, self.slots)
        try:
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return await self._stream(request, gen, reply, include_usage)
            return await self._whole(request, gen, reply)
        except ClientGone:
            fields["client_disconnected"] = True
            return Response(status_code=499)  # nobody reads it
        except BaseException:
            await gen.aclose()
            raise

    async def _whole(self, request: Request, gen: Generation, reply: Reply) -> Response:
        async def run() -> JSONResponse:
            async with gen:
                chunk = await gen.next()
                while chunk.result is None:
                    chunk = await gen.next()
            log_fields(request.scope)["completion_tokens"] = len(chunk.result.token_ids)
            request.state.principal.used(len(chunk.result.token_ids))
            return JSONResponse(reply.full(chunk.result).model_dump(mode="json"))

        return await until_disconnect(request.receive, run)

    async def _stream(
        self, request: Request, gen: Generation, reply: Reply, include_usage: bool
    ) -> Response:
        """Start the generation and take its first chunk before any header is sent, so that
        a request the engine refuses gets a plain error status."""
        encode = Encoder(reply, TokenSpans(self.tokenizer), include_usage)
        fields = log_fields(request.scope)

        async def first() -> bytes:
            await gen.start()
            return (await gen.step(encode))[1]

        try:
            data = await until_disconnect(request.receive, first)
        except BaseException:
            await gen.aclose()
            raise

        async def close() -> None:
            fields["completion_tokens"] = encode.completion_tokens
            request.state.principal.used(encode.completion_tokens)
            await gen.aclose()

        def gone() -> None:
            fields["client_disconnected"] = True

        return EventStream(events(gen, data, encode), close, gone)
