"""The gateway's side of the Redis job queue: submit jobs, route their events back.

Each gateway process has one reply stream in Redis. Workers append the events of
all of this gateway's jobs to it, and one background task reads it with a blocking
XREAD and hands each event to the job's Subscription. One reader per process, not
one blocking read per request, keeps Redis connections and wake-ups independent of
the number of open streams. The reply stream expires unless the gateway keeps
touching it, so a dead gateway leaves nothing behind (workers write with NOMKSTREAM).
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common import codec, keys, streams
from gateway.errors import Unavailable
from gateway.validation import ValidRequest

log = logging.getLogger(__name__)

REPLY_STREAM_TTL_SECONDS = 60
_KEEPALIVE_SECONDS = 5
_TRIM_EVERY_SECONDS = 1.0


class Subscription:
    """The events of one job, in order, as the reply reader delivers them."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._events: deque[codec.Event] = deque()
        self._arrived = asyncio.Event()
        self._next_seq = 0
        self.gap: str | None = None  # set when an event went missing

    def deliver(self, event: codec.Event) -> None:
        if event.seq < self._next_seq:
            return  # a duplicate (e.g. a re-delivered batch)
        if event.seq > self._next_seq and self.gap is None:
            self.gap = f"events {self._next_seq}..{event.seq - 1} of the job were lost"
        self._next_seq = event.seq + 1
        self._events.append(event)
        self._arrived.set()

    async def next(self) -> codec.Event:
        while not self._events:
            self._arrived.clear()
            await self._arrived.wait()
        if self.gap is not None:
            raise Unavailable(f"lost contact with the worker: {self.gap}")
        return self._events.popleft()

    def take_ready_delta(self) -> codec.Event | None:
        """The next event if it is a delta that has already arrived (to coalesce a backlog)."""
        if self._events and self._events[0].WhichOneof("kind") == "delta":
            return self._events.popleft()
        return None


class JobQueue:
    def __init__(self, redis: Redis, reader: Redis, gateway_id: str) -> None:
        self._redis = redis
        self._reader = reader  # its own connection: the blocking XREAD holds it
        self._gateway_id = gateway_id
        self._reply_stream = keys.reply_stream(gateway_id)
        self._subscriptions: dict[str, Subscription] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._touch_reply_stream()
        self._tasks = [
            asyncio.create_task(self._read_replies(), name="reply-reader"),
            asyncio.create_task(self._keep_reply_stream(), name="reply-keepalive"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        with contextlib.suppress(RedisError):  # it expires on its own otherwise
            await self._redis.delete(self._reply_stream)

    @property
    def num_subscriptions(self) -> int:
        return len(self._subscriptions)

    async def submit(self, request: ValidRequest, deadline: float) -> Subscription:
        """Queues a validated request; its events arrive on the returned Subscription."""
        request_id = uuid.uuid4().hex
        job = codec.Job(
            request_id=request_id,
            model=request.model,
            prompt_token_ids=request.prompt_token_ids,
            sampling=codec.SamplingParams(
                temperature=request.temperature,
                top_p=request.top_p,
                max_tokens=request.max_tokens,
                seed=request.seed,
                stop=request.stop,
                json_mode=request.json_mode,
            ),
            enqueued_at=time.time(),
            deadline=deadline,
            reply_to=self._reply_stream,
            gateway_id=self._gateway_id,
        )
        subscription = Subscription(request_id)
        self._subscriptions[request_id] = subscription  # before XADD: no event can be missed
        try:
            await self._redis.xadd(keys.job_stream(request.model), {keys.PAYLOAD_FIELD: codec.encode(job)})
        except RedisError as exc:
            self._subscriptions.pop(request_id, None)
            raise Unavailable(f"job queue unreachable: {exc}") from exc
        return subscription

    def release(self, request_id: str, cancel_until: float | None = None) -> None:
        """Stops routing the job's events; with cancel_until, also tells workers to drop the job."""
        self._subscriptions.pop(request_id, None)
        if cancel_until is not None:
            task = asyncio.create_task(self._cancel(request_id, cancel_until))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _cancel(self, request_id: str, until: float) -> None:
        # The flag must outlive the job's wait in the queue; after its deadline the job is dropped anyway.
        ttl = max(1, int(until - time.time()) + 60)
        try:
            await self._redis.set(keys.cancel_flag(request_id), b"1", ex=ttl)
        except RedisError as exc:
            log.warning("cannot cancel job %s: %s (its deadline still ends it)", request_id, exc)

    async def _read_replies(self) -> None:
        last_id = b"0-0"
        last_trim = time.monotonic()
        while True:
            try:
                reply = await self._reader.xread({self._reply_stream: last_id}, count=1024, block=1000)
            except RedisError as exc:
                log.warning("reply stream unreadable: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for entry_id, fields in streams.entries(reply):
                last_id = entry_id
                self._route(fields.get(keys.PAYLOAD_FIELD))
            if reply and time.monotonic() - last_trim > _TRIM_EVERY_SECONDS:
                last_trim = time.monotonic()
                await self._trim(last_id)

    def _route(self, payload: bytes | None) -> None:
        if payload is None:
            return  # the marker entry that creates the stream
        try:
            event = codec.decode_event(payload)
        except codec.BadPayload as exc:
            log.error("dropping malformed event: %s", exc)
            return
        subscription = self._subscriptions.get(event.request_id)
        if subscription is not None:
            subscription.deliver(event)

    async def _trim(self, last_id: bytes) -> None:
        try:
            await self._redis.xtrim(self._reply_stream, minid=last_id, approximate=False)
        except RedisError as exc:
            log.warning("cannot trim reply stream: %s", exc)

    async def _touch_reply_stream(self) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self._reply_stream, {b"created": b"1"})
            pipe.expire(self._reply_stream, REPLY_STREAM_TTL_SECONDS)
            await pipe.execute()

    async def _keep_reply_stream(self) -> None:
        while True:
            await asyncio.sleep(_KEEPALIVE_SECONDS)
            try:
                await self._touch_reply_stream()
            except RedisError as exc:
                log.warning("cannot refresh reply stream: %s", exc)
