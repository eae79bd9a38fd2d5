"""A TCP proxy on loopback that delays traffic and counts bytes at the socket.

Used where netem is not available (this machine's kernel has no sch_netem): each chunk read
from one side is written to the other ``one_way`` seconds later, in order, so a round trip
costs ``2 * one_way`` more. The byte counters see everything on the wire above TCP: HTTP/2
frames, gRPC framing, pings, window updates, headers.
"""

from __future__ import annotations

import asyncio
import threading
import time


class DelayProxy:
    """Forwards 127.0.0.1:<port> to ``target`` (host, port) with a one-way delay."""

    def __init__(self, target: tuple[str, int], one_way: float = 0.0, port: int = 0) -> None:
        self.target, self.one_way, self.port = target, one_way, port
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def reset_counters(self) -> None:
        self.bytes_up = self.bytes_down = 0

    # ---- the event loop thread ----

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_w, up=True),
                self._pipe(up_r, writer, up=False),
                return_exceptions=True,
            )
        except asyncio.CancelledError:  # the proxy stops with the connection open: end quietly
            writer.close()
            up_w.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        """Copy src to dst, each chunk delivered one_way seconds after it was read."""
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if data is None:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()
            dst.close()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                queue.put_nowait((time.monotonic() + self.one_way, data))
        finally:
            queue.put_nowait((0.0, None))
            await sender
