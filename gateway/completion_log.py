"""Completion logs: how a dropped stream resumes, and how a retried call attaches to its job.

Every event of a job goes to two places in one step (worker/publisher.py): the reply stream
of the gateway that queued it, which relays it live and trims it as it reads, and the job's
completion log (common/keys.py completion_log()), which any gateway can read from any point
until GATEWAY_RESUME_WINDOW_SECONDS after the call ended. The log's first entry is the call's
record: who may read it (the API key's digest) and what every response of the call shares.

A reader feeds the log's events through the same Subscription and translation as the live
call (gateway/relay.py), so both number what they send alike: each chunk carries the position
of the last job event behind it (`sequence_number`, the SSE `id`), and resuming after N yields
exactly what came after N. Chunk boundaries may differ (a lagging reader gets deltas merged);
the text up to any position never does.

While somebody reads a log, it holds the completion's `watched` lease: a job whose caller
dropped keeps running while that lease is held, and for GATEWAY_RESUME_GRACE_SECONDS after
the drop in any case (gateway/relay.py), so a resume finds the rest of it.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common import codec, keys, streams
from gateway.errors import (
    JOB_FAILURES,
    STATUSES,
    CompletionNotFound,
    JobFailed,
    ServiceError,
    Status,
    Unavailable,
)
from gateway.tiers import ON_DEMAND

log = logging.getLogger(__name__)

CALL_FIELD = b"call"  # the first entry's: the call's record, JSON
END_CODE_FIELD = b"end"  # an entry that ends the call without its job's terminal event: gRPC code
END_MESSAGE_FIELD = b"message"
_READ_BLOCK_MS = 1000


@dataclass(frozen=True)
class CallRecord:
    """What every response of a completion shares, and whose it is."""

    request_id: str
    owner: str  # the API key's digest, or "anonymous" while auth is off
    model: str
    created: int
    deadline: float  # Unix time: the job ends by then
    choices: int = 1  # the request's n
    service_tier: str = ON_DEMAND  # the tier serving it (gateway/tiers.py)

    def to_json(self) -> bytes:
        record = asdict(self)
        if self.choices == 1:
            del record["choices"]  # so that gateways older than n > 1 read the record too
        if self.service_tier == ON_DEMAND:
            del record["service_tier"]  # likewise, for gateways older than the flex lane
        return json.dumps(record).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "CallRecord":
        # Fields a newer gateway added are skipped, fields an older one lacked keep their default.
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(data).items() if k in known})


def parse_entry(request_id: str, fields: dict[bytes, bytes]) -> codec.Event | ServiceError | None:
    """A log entry as the job event it holds, or the error the call ended with (None: the record)."""
    if (code := fields.get(END_CODE_FIELD)) is not None:
        return ended_with(int(code), fields.get(END_MESSAGE_FIELD, b"").decode(errors="replace"))
    payload = fields.get(keys.PAYLOAD_FIELD)
    if payload is None:
        return None
    try:
        return codec.decode_event(payload)
    except codec.BadPayload as exc:
        log.error("malformed event in the log of job %s: %s", request_id, exc)
        return ServiceError("the worker sent a malformed event")


def _typed(reply: Any) -> list[streams.Entry]:
    """An XRANGE reply with its types (redis-py returns it untyped)."""
    return list(reply or [])


def ended_with(code: int, message: str) -> ServiceError:
    """The error a call ended with, as its log tells it to a reader (the same code and message)."""
    # The jobs' table first: it has CANCELLED (499), which no gateway error has.
    status = next((s for s in (*JOB_FAILURES.values(), *STATUSES.values()) if s.grpc == code), None)
    return JobFailed(status or Status(code, 500, "api_error"), message)


class CompletionLog:
    def __init__(self, redis: Redis, window_seconds: float, grace_seconds: float) -> None:
        self._redis = redis
        self.window_ms = int(window_seconds * 1000)
        self.grace_seconds = grace_seconds

    async def open(self, request_id: str, owner: str) -> CallRecord:
        """The completion's record; CompletionNotFound when it is unknown, expired or another key's."""
        try:
            first = _typed(await self._redis.xrange(keys.completion_log(request_id), count=1))
        except RedisError as exc:
            raise Unavailable.hiding("cannot read the completion", exc, request_id) from exc
        if first:
            _, fields = first[0]
            if (data := fields.get(CALL_FIELD)) is not None:
                record = CallRecord.from_json(data)
                if record.owner == owner:
                    return record
        # Another key's completion is "not found" too: its id must not tell anybody it exists.
        raise CompletionNotFound(request_id)

    async def read(self, request_id: str, after: bytes, block: bool) -> list[streams.Entry]:
        """The log's entries after `after`; with block, waits up to a second for the first."""
        name = keys.completion_log(request_id)
        if not block:
            return _typed(await self._redis.xrange(name, min=b"(" + after if after != b"0-0" else "-"))
        reply = await self._redis.xread({name: after}, block=_READ_BLOCK_MS)
        return list(streams.entries(reply))

    async def exists(self, request_id: str) -> bool:
        return bool(await self._redis.exists(keys.completion_log(request_id)))

    async def ended(self, request_id: str, error: ServiceError | None = None) -> None:
        """The call has ended: its log is kept for the window from now. `error`: how it ended, where
        its job's own events do not say (a deadline, a lost job, a caller that never came back)."""
        name = keys.completion_log(request_id)
        try:
            # Not a transaction (a Redis Cluster client runs those poorly); in order on one
            # connection, and if the second fails the log still expires with its deadline.
            async with self._redis.pipeline(transaction=False) as pipe:
                if error is not None:
                    fields = {END_CODE_FIELD: str(error.code), END_MESSAGE_FIELD: error.message}
                    pipe.xadd(name, fields, nomkstream=True)  # type: ignore[arg-type]
                pipe.pexpire(name, self.window_ms)
                await pipe.execute()
        except RedisError as exc:  # it still expires after the job's deadline plus the window
            log.warning("cannot record the end of completion %s: %s", request_id, exc)

    async def is_watched(self, request_id: str) -> bool:
        try:
            return bool(await self._redis.exists(keys.watched(request_id)))
        except RedisError:
            return True  # cannot tell: keep the job rather than cancel what somebody may read

    @contextlib.asynccontextmanager
    async def watching(self, request_id: str) -> AsyncIterator[None]:
        """Holds the completion's `watched` lease while the block runs."""
        task = asyncio.create_task(self._hold_lease(request_id), name=f"watch-{request_id}")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _hold_lease(self, request_id: str) -> None:
        lease_ms = max(1000, int(self.grace_seconds * 1000))
        while True:
            try:
                await self._redis.set(keys.watched(request_id), b"1", px=lease_ms)
            except RedisError as exc:
                log.warning("cannot hold the lease on completion %s: %s", request_id, exc)
            await asyncio.sleep(lease_ms / 3000)
