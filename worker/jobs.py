"""The worker's side of the job stream: every Redis command on jobs goes through JobStream.

A job stays in the consumer group's pending list from delivery to acknowledgement.
A live worker heartbeats by resetting the idle time of the entries it still owns;
an entry idle for longer than the claim timeout belongs to a worker that died (or
froze) and is reclaimed by another worker with XAUTOCLAIM, which counts deliveries.
That count is the job's attempt number; past the limit the job is dead-lettered.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common import codec, keys, streams

log = logging.getLogger(__name__)

# Resets the idle time of the given entries that this consumer still owns; returns those.
# Atomic, so a frozen worker that wakes up cannot take back a job another worker reclaimed.
_TOUCH_OWNED = """
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    table.insert(owned, ARGV[i])
  end
end
return owned
"""

# Idle time given to handed-back entries: any other worker's next XAUTOCLAIM takes them.
_HANDED_BACK_IDLE_MS = 10**12
DEAD_LETTER_MAXLEN = 10_000


@dataclass(frozen=True)
class Delivery:
    """One job as a worker received it."""

    entry_id: bytes
    request_id: str
    reply_to: str
    attempt: int  # 1 for the first delivery
    job: codec.Job | None  # None when the payload cannot be decoded
    fields: dict[bytes, bytes] = field(repr=False, default_factory=dict)  # the raw stream entry
    error: str = ""  # why job is None

    @classmethod
    def parse(cls, entry_id: bytes, fields: dict[bytes, bytes], attempt: int) -> "Delivery":
        request_id = fields.get(keys.REQUEST_ID_FIELD, b"").decode(errors="replace")
        reply_to = fields.get(keys.REPLY_TO_FIELD, b"").decode(errors="replace")
        try:
            job = codec.decode_job(fields.get(keys.PAYLOAD_FIELD, b""))
        except codec.BadPayload as exc:
            return cls(entry_id, request_id, reply_to, attempt, None, fields, str(exc))
        return cls(entry_id, job.request_id, job.reply_to, attempt, job, fields)


class JobStream:
    def __init__(self, redis: Redis, model: str, worker_id: str) -> None:
        self._redis = redis
        self.stream = keys.job_stream(model)
        self._dead_letters = keys.dead_letter_stream(model)
        self._worker_id = worker_id
        self._touch_owned = redis.register_script(_TOUCH_OWNED)

    async def ensure_group(self) -> None:
        try:
            # Id 0: jobs queued before any worker existed are served too.
            await self._redis.xgroup_create(self.stream, keys.WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_new(self, count: int, block_ms: int) -> list[Delivery]:
        reply = await self._redis.xreadgroup(
            keys.WORKER_GROUP, self._worker_id, {self.stream: ">"}, count=count, block=block_ms
        )
        return [Delivery.parse(entry_id, fields, 1) for entry_id, fields in streams.entries(reply)]

    async def reclaim(self, count: int, min_idle_ms: int) -> list[Delivery]:
        """Takes over jobs whose worker has not heartbeated for min_idle_ms."""
        reply = await self._redis.xautoclaim(
            self.stream, keys.WORKER_GROUP, self._worker_id, min_idle_ms, start_id="0-0", count=count
        )
        claimed, deleted = reply[1], reply[2] if len(reply) > 2 else []
        if deleted:  # entries deleted while pending: nothing left to run
            await self._redis.xack(self.stream, keys.WORKER_GROUP, *deleted)
        deliveries = []
        for entry_id, fields in claimed:
            [pending] = await self._redis.xpending_range(
                self.stream, keys.WORKER_GROUP, entry_id, entry_id, 1
            )
            deliveries.append(Delivery.parse(entry_id, fields, int(pending["times_delivered"])))
        return deliveries

    async def heartbeat(self, entry_ids: list[bytes]) -> set[bytes]:
        """Marks our running jobs as alive; returns the ids we still own (others were reclaimed)."""
        if not entry_ids:
            return set()
        owned = await self._touch_owned(
            keys=[self.stream], args=[keys.WORKER_GROUP, self._worker_id, *entry_ids]
        )
        return {bytes(e) if not isinstance(e, bytes) else e for e in owned}

    async def acknowledge(self, entry_id: bytes, request_id: str) -> None:
        """Removes a finished job from the stream (and its cancel flag, which has served its purpose)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, keys.WORKER_GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            pipe.delete(keys.cancel_flag(request_id))
            await pipe.execute()

    async def hand_back(self, entry_ids: list[bytes]) -> None:
        """Makes our unfinished jobs claimable by other workers at once (used when draining)."""
        if entry_ids:
            await self._redis.xclaim(
                self.stream,
                keys.WORKER_GROUP,
                self._worker_id,
                0,
                list[Any](entry_ids),
                idle=_HANDED_BACK_IDLE_MS,
                justid=True,
            )

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Moves a job that cannot or must not run again to the dead-letter stream."""
        log.error("dead-lettering job %s (entry %s): %s", delivery.request_id, delivery.entry_id, reason)
        record: dict[Any, Any] = {
            **delivery.fields,
            b"reason": reason.encode(),
            b"attempt": str(delivery.attempt).encode(),
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self._dead_letters, record, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            pipe.xack(self.stream, keys.WORKER_GROUP, delivery.entry_id)
            pipe.xdel(self.stream, delivery.entry_id)
            pipe.delete(keys.cancel_flag(delivery.request_id))
            await pipe.execute()
