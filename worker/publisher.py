"""Writes job events to Redis, many per round trip.

Runners call `publish()` without waiting. One background task writes whatever has
accumulated since its last round trip in a single pipeline, so an engine step that
produces a token for each of 100 jobs costs one round trip, not 100. Events keep
their order because batches are written one after another.
"""

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common import codec, keys

log = logging.getLogger(__name__)


class EventPublisher:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._batch: list[tuple[str, bytes, bytes]] = []  # (reply stream, request id, payload)
        self._batch_written: asyncio.Future[None] | None = None  # resolves when _batch is in Redis
        self._in_flight: asyncio.Future[None] | None = None  # the batch being written now
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    async def stop(self) -> None:
        if self._task is not None:
            await self.flush()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def publish(self, reply_to: str, event: codec.Event) -> None:
        if self._batch_written is None:
            self._batch_written = asyncio.get_running_loop().create_future()
            # Nobody may await this batch; mark a failure as seen so asyncio does not warn.
            self._batch_written.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._batch.append((reply_to, event.request_id.encode(), codec.encode(event)))
        self._wakeup.set()

    async def flush(self) -> None:
        """Waits until everything published so far is in Redis; raises RedisError if it cannot be."""
        pending = self._batch_written or self._in_flight
        if pending is not None:
            await asyncio.shield(pending)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, written = self._batch, self._batch_written
            self._batch, self._batch_written, self._in_flight = [], None, written
            if written is None:
                continue
            try:
                await self._write(batch)
            except RedisError as exc:
                log.error("lost %d events: %s", len(batch), exc)
                written.set_exception(exc)
            else:
                written.set_result(None)
            finally:
                self._in_flight = None

    async def _write(self, batch: list[tuple[str, bytes, bytes]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for reply_to, request_id, payload in batch:
                fields: dict[Any, Any] = {keys.REQUEST_ID_FIELD: request_id, keys.PAYLOAD_FIELD: payload}
                # NOMKSTREAM: a gateway that died has let its reply stream expire; don't recreate it.
                pipe.xadd(reply_to, fields, nomkstream=True)
            await pipe.execute()
