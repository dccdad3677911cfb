"""gateway.http._with_keepalives: an HTTP stream's items with a None wherever it fell silent.

The HTTP handler writes a `: keepalive` comment for each None. The item awaited across a
silence is the relay's next item: cancelling it would end the call (and cancel its job), so
a silence must only ever add a None, never disturb the wait.
"""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest

from gateway.http import _with_keepalives

SILENCE = 0.02  # seconds without an item before a keepalive


def keepalives(items: AsyncIterator[str]) -> AsyncGenerator[Any]:
    """_with_keepalives over items, closable as the HTTP handler closes it when its caller leaves."""
    stream = _with_keepalives(items, SILENCE)
    assert isinstance(stream, AsyncGenerator)
    return stream


class Source:
    """Items handed out one per `release()`, recording whether a wait was ever cancelled."""

    def __init__(self, items: list[str]) -> None:
        self._items = items
        self._released = asyncio.Semaphore(0)
        self.waits_started = 0
        self.cancelled = False
        self.closed = False

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._released.release()

    async def __call__(self) -> AsyncIterator[str]:
        try:
            for item in self._items:
                self.waits_started += 1
                try:
                    await self._released.acquire()
                except asyncio.CancelledError:
                    self.cancelled = True
                    raise
                yield item
        finally:
            self.closed = True


async def test_items_that_come_at_once_pass_through_without_keepalives() -> None:
    async def items() -> AsyncIterator[str]:
        for item in ("a", "b", "c"):
            yield item

    assert [item async for item in keepalives(items())] == ["a", "b", "c"]


async def test_a_silence_yields_none_and_the_item_still_arrives_after_it() -> None:
    source = Source(["a"])
    stream = keepalives(source())
    assert await anext(stream) is None
    assert await anext(stream) is None  # one per silence, for as long as it lasts
    source.release()
    assert await anext(stream) == "a"
    with pytest.raises(StopAsyncIteration):  # the end of the items ends it
        await anext(stream)


async def test_the_pending_item_is_never_cancelled_by_a_silence() -> None:
    source = Source(["a", "b"])
    stream = keepalives(source())
    for _ in range(5):
        assert await anext(stream) is None
    source.release(2)
    assert await anext(stream) == "a"
    # Five silences, and one wait for "a" throughout: never cancelled, never started again.
    assert source.waits_started == 1 and not source.cancelled
    assert await anext(stream) == "b"
    await stream.aclose()


async def test_an_error_of_the_items_reaches_the_reader() -> None:
    async def items() -> AsyncIterator[str]:
        yield "a"
        await asyncio.sleep(SILENCE * 3)
        raise RuntimeError("the call broke")

    stream = keepalives(items())
    assert await anext(stream) == "a"
    with pytest.raises(RuntimeError, match="the call broke"):
        while True:
            await anext(stream)


async def test_closing_it_during_a_silence_stops_the_pending_wait() -> None:
    # The caller left: the wait for the relay's next item must end with it, not linger.
    source = Source(["a"])
    stream = keepalives(source())
    assert await anext(stream) is None
    await stream.aclose()
    assert source.cancelled
