"""One synchronous generation driven from async code, freed the moment nobody wants it.

The generate function (``GenerateFn``) blocks: each ``next()`` waits for a verification
round of the batch scheduler. ``Generation`` runs every step in a worker thread (so many
HTTP requests go through the scheduler at once) and closes the generator when it ends,
fails, or is abandoned: a client that disconnects cancels the step in flight, which
finishes its round and then closes the generator, so the engine's ``finally`` frees the
session at once rather than when the garbage collector finds the generator.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import anyio

from specsplit.engine.speculative import Chunk, GenerationRequest
from specsplit.errors import SpecsplitError
from specsplit.transport.http_face.errors import APIError, from_engine, internal

GenerateFn = Callable[[GenerationRequest], Iterator[Chunk]]
T = TypeVar("T")

log = logging.getLogger("specsplit.http")


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


class Generation:
    """``async with Generation(...) as g``: ``await g.next()`` until a chunk carries the
    result; leaving the block closes the generator (in a thread, shielded from cancel)."""

    def __init__(
        self,
        generate: GenerateFn,
        req: GenerationRequest,
        limiter: anyio.CapacityLimiter,
        slot: anyio.Semaphore | None = None,
    ) -> None:
        self.generate, self.req = generate, req
        self.limiter, self.slot = limiter, slot
        self.it: Iterator[Chunk] | None = None
        self.held = False  # a slot is held
        self.done = False

    async def start(self) -> None:
        """Wait for a generation slot (if bounded) and call the generate function."""
        if self.slot is not None:
            await self.slot.acquire()
            self.held = True
        self.it = await self._run(lambda: iter(self.generate(self.req)))

    async def __aenter__(self) -> Generation:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def next(self) -> Chunk:
        """The next chunk; engine errors become API errors (400 or 503), a generator that
        ends without a result a 500."""
        chunk, _ = await self.step(lambda c: None)
        return chunk

    async def step(self, then: Callable[[Chunk], T]) -> tuple[Chunk, T]:
        """The next chunk and then(chunk), both in the worker thread (``then`` reads the
        chunk's live statistics before the generator moves on)."""
        assert self.it is not None and not self.done

        def work() -> tuple[Chunk | None, T | None]:
            chunk = next(self.it, None)
            return chunk, None if chunk is None else then(chunk)

        chunk, out = await self._run(work)
        if chunk is None:
            log.error("the generator ended without a result")
            raise internal()
        self.done = chunk.result is not None
        return chunk, out  # type: ignore[return-value]

    async def _run(self, fn: Callable[[], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(fn, limiter=self.limiter)
        except SpecsplitError as e:
            raise from_engine(e) from e
        except APIError:
            raise
        except Exception as e:
            log.error("internal error in the generator", exc_info=e)
            raise internal() from e

    async def aclose(self) -> None:
        """Close the generator (its ``finally`` closes the session) and free the slot."""
        it, self.it = self.it, None
        with anyio.CancelScope(shield=True):
            try:
                if it is not None and hasattr(it, "close"):
                    await anyio.to_thread.run_sync(it.close)
            except Exception as e:
                log.error("closing a generation failed", exc_info=e)
            finally:
                if self.held:
                    self.held = False
                    self.slot.release()  # type: ignore[union-attr]


async def until_disconnect(
    receive: Callable[[], Awaitable[dict]], work: Callable[[], Awaitable[T]]
) -> T:
    """Run work, cancelling it if the client disconnects first (then raises ClientGone)."""
    outcome: list[tuple[bool, object]] = []

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                outcome.append((True, await work()))
            except Exception as e:  # re-raised below, not wrapped in an ExceptionGroup
                outcome.append((False, e))
            tg.cancel_scope.cancel()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        tg.start_soon(watch)
    if not outcome:
        raise ClientGone
    ok, value = outcome[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]
