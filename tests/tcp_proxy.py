"""A TCP proxy between a Redis client and redis-server that can misbehave on purpose.

It runs its own event loop in a thread, so sync tests that block on gRPC calls and async
tests alike can put it between a process (or a client) and Redis:

- hold_replies(seconds, count): the next `count` replies from Redis reach the client only
  after `seconds`; Redis has executed the command, the client times out first. This is how
  a command is made to look failed although it ran (the retry path).
- blackhole(): every open connection stops forwarding in both directions without closing,
  like a peer lost without a FIN (failover, partition). New connections work normally.
- cut(): every open connection is closed at once, both ways, as when a link or a load
  balancer in between fails. New connections work normally.
"""

import asyncio
import contextlib
import gc
import threading
from types import TracebackType

_CHUNK = 1 << 16


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self._upstream = (upstream_host, upstream_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._held = 0  # replies still to hold back
        self._passed = 0  # replies still to let through before holding any
        self._hold_seconds = 0.0
        self._blackholed: set[asyncio.StreamWriter] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self.reply_held = threading.Event()  # set when Redis has answered a command we hold back
        self.port = 0

    def __enter__(self) -> "TcpProxy":
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
        # Clients that timed out leave sockets for the garbage collector; collect them now, so their
        # ResourceWarnings are not raised in the middle of a later import (which trips CPython
        # 3.11's "AST constructor recursion depth mismatch").
        gc.collect()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def num_connections(self) -> int:
        return len(self._open)

    def hold_replies(self, seconds: float, count: int = 1, after: int = 0) -> None:
        """Holds the next `count` replies back for `seconds` each, once `after` replies went through."""

        def arm() -> None:
            self._held, self._hold_seconds, self._passed = count, seconds, after
            self.reply_held.clear()

        self._loop.call_soon_threadsafe(arm)

    def blackhole(self) -> None:
        """Open connections go silent both ways; they stay open, as after a lost peer."""
        self._loop.call_soon_threadsafe(lambda: self._blackholed.update(self._open))

    def cut(self) -> None:
        """Closes every open connection now, without flushing what is in flight; returns once closed."""
        self._call(self._cut())

    async def _cut(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()  # the client's side; _serve then closes the upstream side

    def _call(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=5)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        self._open.add(client_writer)
        try:
            await asyncio.gather(
                self._pump(client_reader, upstream_writer, client_writer, replies=False),
                self._pump(upstream_reader, client_writer, client_writer, replies=True),
            )
        finally:
            self._open.discard(client_writer)
            for writer in (client_writer, upstream_writer):
                writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        replies: bool,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(_CHUNK):
                if client in self._blackholed:
                    continue  # swallowed: neither side hears anything more
                if replies and self._passed > 0:
                    self._passed -= 1
                elif replies and self._held > 0:
                    self._held -= 1
                    self.reply_held.set()
                    await asyncio.sleep(self._hold_seconds)
                writer.write(data)
                await writer.drain()
        writer.close()
