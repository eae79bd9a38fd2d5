"""Server-sent events: one event per text piece, a final one with usage and statistics,
then ``data: [DONE]``; an error after the stream began is an ``{"error": ...}`` event.

``EventStream`` is the ASGI response: it watches for the client's disconnect itself (on
any ASGI server, Ray Serve's proxy included) and, whether the stream ends, fails or is
abandoned, closes the generation so the engine frees its session at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from specsplit.engine.speculative import Chunk
from specsplit.transport.http_face.errors import APIError
from specsplit.transport.http_face.generation import Generation
from specsplit.transport.http_face.responses import Reply, Span, progress
from specsplit.transport.http_face.spans import TokenSpans

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: BaseModel | dict) -> bytes:
    """One event: ``data: <compact JSON>`` and a blank line."""
    if isinstance(obj, BaseModel):
        data = obj.model_dump_json()
    else:
        data = json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Encoder:
    """A request's chunks -> its events (runs in the generation's worker thread)."""

    def __init__(self, reply: Reply, spans: TokenSpans, include_usage: bool) -> None:
        self.reply, self.spans, self.include_usage = reply, spans, include_usage
        self.completion_tokens = 0

    def __call__(self, chunk: Chunk) -> bytes:
        out: list[bytes] = []
        self.completion_tokens += len(chunk.token_ids)
        self.spans.add(chunk.token_ids, chunk.origins)
        if chunk.text:
            spans = [Span(text=t, origin=o) for t, o in self.spans.split(chunk.text)]
            ext = progress(spans, chunk.stats or (chunk.result and chunk.result.stats))
            out.append(sse(self.reply.piece(chunk.text, specsplit=ext)))
        if chunk.result is not None:
            self.completion_tokens = len(chunk.result.token_ids)
            out.append(sse(self.reply.last(chunk.result)))
            if self.include_usage:
                out.append(sse(self.reply.usage_only(chunk.result)))
            out.append(DONE)
        return b"".join(out)


async def events(gen: Generation, first: bytes, encode: Encoder) -> AsyncIterator[bytes]:
    """The events of a started generation whose first chunk is encoded already."""
    yield first
    while not gen.done:
        try:
            _, data = await gen.step(encode)
        except APIError as e:  # headers are sent: the error goes in the stream
            yield sse(e.body()) + DONE
            return
        yield data


class EventStream(StreamingResponse):
    """``text/event-stream`` from events; on_close runs however the stream ends."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        on_gone: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=HEADERS)
        self.body_iterator = body
        self.on_close, self.on_gone = on_close, on_gone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not finished:  # (a server reports a disconnect after the end too)
                        self.on_gone()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    await self.stream_response(send)
                    finished = True
                except OSError:  # a server that reports the disconnect on send (ASGI 2.4)
                    self.on_gone()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self.on_close()
