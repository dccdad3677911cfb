"""The worker's side of the job stream: every Redis command on jobs goes through JobStream.

A job stays in the consumer group's pending list from delivery to acknowledgement.
A live worker heartbeats by resetting the idle time of the entries it still owns;
an entry idle for longer than the claim timeout belongs to a worker that died (or
froze) and is reclaimed by another worker with XAUTOCLAIM, which counts deliveries.
That count is the job's attempt number; past the limit the job is dead-lettered.
"""

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from common import codec, keys, streams
from common.redis_client import MAX_BLOCK_SECONDS

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

# Removes consumers (other than ARGV[1]) that own no pending entries and have not read for
# ARGV[2] ms: workers that died or were scaled away. Atomic, so a consumer that reads again in
# between keeps its name (XGROUP DELCONSUMER would drop its pending entries). Returns their names.
_FORGET_DEAD_CONSUMERS = """
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[3])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[1] and info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[3], info['name'])
    table.insert(removed, info['name'])
  end
end
return removed
"""

# Makes the job's progress record the taking attempt's (ARGV[1], in the record's attempt field)
# and returns the record as it was; nil when there is none. Atomic, so from this step on the
# events of the attempt taken over are dropped (worker/publisher.py), and the record returned is
# exactly what its gateway can have read.
_TAKE_OVER_PROGRESS = """
local record = redis.call('GET', KEYS[1])
if record then redis.call('SETRANGE', KEYS[1], 0, ARGV[1]) end
return record
"""

# Ending a job (acknowledge or dead-letter) takes three steps, because its entry lives in its
# queue's slot and its progress record in its gateway's (common/keys.py). The job is this
# attempt's while its pending entry names this consumer and no later attempt owns its progress
# record: a worker that froze past the claim timeout and woke after another took the job over
# must not acknowledge it, which would delete the live attempt's entry and record, fence off all
# its events and leave its caller waiting to the deadline.
#   1. read the record's attempt: a later one owns the job, stop (a takeover claims the entry
#      before it takes the record, so step 2 sees any takeover that step 1 missed);
#   2. _END_OWNED, atomic in the queue's slot: if the entry still names this consumer, record a
#      dead letter (if any), acknowledge and delete the entry, its cancel flag and marker;
#   3. _DROP_PROGRESS: delete the record unless a later attempt owns it.
# A crash before step 2 leaves the job pending (another worker reclaims it, as for any death);
# one between steps 2 and 3 leaves only the record, which expires after the job's deadline.
#
# _END_OWNED KEYS: job stream, cancel flag, submitted marker, dead-letter stream; ARGV: group,
# consumer, entry id, and for a dead letter the MAXLEN and fields to record (name, value, ...).
# Returns 1 if the job was ended, 0 if it was not ours.
_END_OWNED = """
local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)[1]
if not entry or entry[2] ~= ARGV[2] then return 0 end
if #ARGV > 3 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""
# KEYS: progress record. ARGV: attempt, width of the record's attempt field.
_DROP_PROGRESS = """
local current = tonumber(redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1))
if current and current > tonumber(ARGV[1]) then return 0 end
return redis.call('DEL', KEYS[1])
"""

# A consumer is forgotten after this many claim timeouts without reading: a live worker reads
# at least every heartbeat, which is much shorter than the claim timeout.
DEAD_CONSUMER_CLAIM_TIMEOUTS = 10

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
    stream: str = ""  # the job stream it came from

    @classmethod
    def parse(cls, entry_id: bytes, fields: dict[bytes, bytes], attempt: int, stream: str = "") -> "Delivery":
        request_id = fields.get(keys.REQUEST_ID_FIELD, b"").decode(errors="replace")
        reply_to = fields.get(keys.REPLY_TO_FIELD, b"").decode(errors="replace")
        try:
            job = codec.decode_job(fields.get(keys.PAYLOAD_FIELD, b""))
        except codec.BadPayload as exc:
            return cls(entry_id, request_id, reply_to, attempt, None, fields, str(exc), stream)
        return cls(entry_id, job.request_id, job.reply_to, attempt, job, fields, stream=stream)


class JobStream:
    """One job stream: a model's shard (keys.job_stream), or a worker's own (keys.worker_stream)."""

    def __init__(self, redis: Redis, model: str, worker_id: str, shard: int = 0, stream: str = "") -> None:
        self._redis = redis
        self.stream = stream or keys.job_stream(model, shard)
        self._dead_letters = keys.dead_letter_stream(self.stream)
        self._worker_id = worker_id
        self._touch_owned = redis.register_script(_TOUCH_OWNED)
        self._forget_dead_consumers = redis.register_script(_FORGET_DEAD_CONSUMERS)
        self._take_over_progress = redis.register_script(_TAKE_OVER_PROGRESS)
        self._end_owned = redis.register_script(_END_OWNED)
        self._drop_progress = redis.register_script(_DROP_PROGRESS)
        # Where the next XAUTOCLAIM scan starts. Each call scans a bounded number of entries, so
        # starting over at 0-0 every time would never get past a long run of live pending entries.
        self._reclaim_cursor = b"0-0"

    async def ensure_group(self) -> None:
        try:
            # Id 0: jobs queued before any worker existed are served too.
            await self._redis.xgroup_create(self.stream, keys.WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_new(self, count: int, block_ms: int | None) -> list[Delivery]:
        """Up to count new jobs, waiting up to block_ms for the first (None: not at all)."""
        return await read_together(self._redis, self._worker_id, [self.stream], count, block_ms)

    async def reclaim(self, count: int, min_idle_ms: int) -> list[Delivery]:
        """Takes over jobs whose worker has not heartbeated for min_idle_ms.

        Scans on from where the previous call stopped (back to the start once past the end), and
        removes consumers of workers gone for good, so the group does not collect dead names.
        """
        reply = await self._redis.xautoclaim(
            self.stream,
            keys.WORKER_GROUP,
            self._worker_id,
            min_idle_ms,
            start_id=self._reclaim_cursor,
            count=count,
        )
        self._reclaim_cursor = reply[0]
        claimed, deleted = reply[1], reply[2] if len(reply) > 2 else []
        if deleted:  # entries deleted while pending: nothing left to run
            await self._redis.xack(self.stream, keys.WORKER_GROUP, *deleted)
        deliveries = []
        for entry_id, fields in claimed:
            pending = await self._redis.xpending_range(self.stream, keys.WORKER_GROUP, entry_id, entry_id, 1)
            if not pending or pending[0]["consumer"] != self._worker_id.encode():
                # Acknowledged (its job ended) or claimed by another worker since our XAUTOCLAIM.
                log.info("entry %s changed hands while being reclaimed; leaving it", entry_id)
                continue
            attempt = int(pending[0]["times_delivered"])
            deliveries.append(Delivery.parse(entry_id, fields, attempt, self.stream))
        return deliveries

    async def forget_dead_consumers(self, claim_idle_ms: int) -> list[str]:
        """Removes the consumers that own no jobs and have not read for DEAD_CONSUMER_CLAIM_TIMEOUTS
        claim timeouts (workers gone for good); returns their names."""
        idle_ms = claim_idle_ms * DEAD_CONSUMER_CLAIM_TIMEOUTS
        names = await self._forget_dead_consumers(
            keys=[self.stream], args=[self._worker_id, idle_ms, keys.WORKER_GROUP]
        )
        forgotten = [bytes(n).decode() for n in names]
        if forgotten:
            log.info("removed consumers of workers gone for good: %s", forgotten)
        return forgotten

    async def heartbeat(self, entry_ids: list[bytes]) -> set[bytes]:
        """Marks our running jobs as alive; returns the ids we still own (others were reclaimed)."""
        if not entry_ids:
            return set()
        owned = await self._touch_owned(
            keys=[self.stream], args=[keys.WORKER_GROUP, self._worker_id, *entry_ids]
        )
        return {bytes(e) if not isinstance(e, bytes) else e for e in owned}

    async def take_over_progress(self, request_id: str, attempt: int) -> codec.Progress | None:
        """What earlier attempts at the job published, now owned by `attempt`; None if nothing.

        Raises codec.BadPayload for a record that cannot be decoded.
        """
        record = await self._take_over_progress(
            keys=[keys.progress(request_id)], args=[codec.encode_progress_attempt(attempt)]
        )
        return None if record is None else codec.decode_progress(bytes(record))

    async def acknowledge(self, delivery: Delivery) -> bool:
        """Removes a finished job from the stream (and its cancel flag, submitted marker and progress
        record, which have served their purpose), if this attempt still owns it; returns whether it did."""
        return await self._end(delivery, [])

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

    async def dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Moves a job that cannot or must not run again to the dead-letter stream, if this attempt
        still owns it; returns whether it did."""
        log.error("dead-lettering job %s (entry %s): %s", delivery.request_id, delivery.entry_id, reason)
        record: dict[bytes, bytes] = {
            **delivery.fields,
            b"reason": reason.encode(),
            b"attempt": str(delivery.attempt).encode(),
        }
        return await self._end(delivery, [DEAD_LETTER_MAXLEN, *(x for pair in record.items() for x in pair)])

    async def _end(self, delivery: Delivery, dead_letter: list[Any]) -> bool:
        """The three steps of ending a job (see _END_OWNED); returns whether it was ours to end."""
        request_id, progress = delivery.request_id, keys.progress(delivery.request_id)
        width = codec.PROGRESS_FIELD_WIDTH
        current = (await self._redis.getrange(progress, 0, width - 1)).strip()
        if current.isdigit() and int(current) > delivery.attempt:
            return False
        ended = await self._end_owned(
            keys=[
                self.stream,
                keys.cancel_flag(self.stream, request_id),
                keys.submitted(self.stream, request_id),
                self._dead_letters,
            ],
            args=[keys.WORKER_GROUP, self._worker_id, delivery.entry_id, *dead_letter],
        )
        if ended:
            await self._drop_progress(keys=[progress], args=[delivery.attempt, width])
        return bool(ended)


async def read_together(
    redis: Redis, worker_id: str, names: list[str], count: int, block_ms: int | None
) -> list[Delivery]:
    """New jobs from one XREADGROUP over job streams of one slot (up to count from each), waiting
    up to block_ms for the first (None: not at all)."""
    if block_ms is not None:  # capped, so the read ends well within the connection's socket timeout
        block_ms = min(block_ms, int(MAX_BLOCK_SECONDS * 1000))
    reply = await redis.xreadgroup(
        keys.WORKER_GROUP, worker_id, {name: ">" for name in names}, count=count, block=block_ms
    )
    return [
        Delivery.parse(entry_id, fields, 1, name)
        for name, (entry_id, fields) in streams.entries_by_stream(reply)
    ]


# Deletes a worker stream whose worker is gone, once it holds no entry and none is pending, and
# drops it from its shard's set. Atomic with the gateways' placing script, which checks the set:
# nothing is placed on a stream once it is gone. KEYS: worker stream, its shard's set of them.
_DROP_WORKER_STREAM = """
if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
if ok and pending[1] > 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], KEYS[1])
return 1
"""

# How long an idle worker of a model with several job streams blocks on one of them before it
# looks at the others again: the most a job waits for it when no idle worker blocks on its stream.
SHARD_BLOCK_MS = 100


def home_shard(worker_id: str, shards: int) -> int:
    """The shard whose slot holds a worker's own stream: any fixed one does, spread by the id."""
    return int(hashlib.sha256(worker_id.encode()).hexdigest(), 16) % shards


class ModelJobs:
    """All job streams a worker reads for one model: the model's REDIS_JOB_STREAMS shards
    (common/keys.py job_stream), read fairly: each read starts at the next shard in turn, so none
    starves while others are busy, and within a stream jobs are taken in order; and the worker's
    own stream (keys.worker_stream), where gateways place jobs whose prompt prefix its engine
    holds (gateway/placement.py), read first. Deliveries remember their stream, and what is done
    with a job goes to that stream. On Redis Cluster the shards live on several nodes: a shard
    that fails costs only its own streams' jobs, never what the others delivered.

    The own streams of other workers are read too, in the reclaim round: their pending jobs once
    the claim timeout passed (as on the shards), their undelivered ones once their worker is no
    longer live, so a worker's death strands nothing placed on it.

    Each shard has a flex lane (keys.flex_stream: jobs of service_tier "flex"), read only with
    the room the on_demand streams leave, and never blocked on: a flex job that arrives while the
    worker waits for work is taken at its next read, within half a heartbeat."""

    def __init__(self, redis: Redis, model: str, worker_id: str, shards: int = 1) -> None:
        self._redis = redis
        self._model = model
        self._worker_id = worker_id
        self.shards = [JobStream(redis, model, worker_id, shard) for shard in range(shards)]
        self.flex = [
            JobStream(redis, model, worker_id, stream=keys.flex_stream(model, shard))
            for shard in range(shards)
        ]
        self.home = home_shard(worker_id, shards)
        self.own = JobStream(redis, model, worker_id, stream=keys.worker_stream(model, self.home, worker_id))
        self._by_name = {s.stream: s for s in [*self.shards, *self.flex, self.own]}
        self._next = secrets.randbelow(shards)  # workers spread their blocking reads over the streams
        # The model's live workers (engine registry), set by the consumer at each heartbeat; until
        # then no other worker's undelivered jobs are taken.
        self.live_workers: frozenset[str] | None = None
        self._gone: set[str] = set()  # worker streams whose worker was not live at the last round

    def of(self, delivery: Delivery) -> JobStream:
        if not delivery.stream and len(self.shards) == 1:
            return self.shards[0]  # a delivery made without its stream (tests)
        return self._by_name[delivery.stream]

    def key(self, delivery: Delivery) -> tuple[str, bytes]:
        """Entry ids are unique within a stream only: (stream, entry id) names one job."""
        return self.of(delivery).stream, delivery.entry_id

    async def ensure_groups(self) -> None:
        """Makes each stream's consumer group where missing, and lists our own stream in its
        shard's set; raises only if no shard answered (one that failed gets its group when a
        read of it finds none, _from_each)."""
        errors: list[RedisError] = []
        lanes = [*self.shards, *self.flex]
        for lane in lanes:
            try:
                await lane.ensure_group()
            except RedisError as exc:
                errors.append(exc)
        if len(errors) == len(lanes):
            raise errors[0]
        with contextlib.suppress(RedisError):  # placement waits for it; jobs are served without
            await self.ensure_own()

    async def ensure_own(self, unless_listed: bool = False) -> None:
        """Makes our own stream's group and lists the stream in its shard's set, where missing:
        gateways place only on a listed stream. At every heartbeat too (unless_listed: only if
        it is not listed), since a worker whose registry entry lapsed (Redis away for a while)
        may find its empty stream removed."""
        listed_in = keys.worker_streams(self._model, self.home)
        if unless_listed and await self._redis.sismember(listed_in, self.own.stream):
            return
        await self.own.ensure_group()
        await self._redis.sadd(listed_in, self.own.stream)

    def _in_turn(self) -> tuple[list[JobStream], list[JobStream]]:
        """The shards and their flex lanes, each read starting at the next shard in turn."""
        start, self._next = self._next, (self._next + 1) % len(self.shards)
        return self.shards[start:] + self.shards[:start], self.flex[start:] + self.flex[:start]

    async def read_new(
        self, count: int, block_ms: int | None, flex_jobs: int | None = None
    ) -> list[Delivery]:
        """Up to count new jobs, our own stream's first, then the shards' in turn, then (at most
        flex_jobs of them, None: any) the flex lanes'; when there are none, waits up to block_ms
        on our own stream and one shard together when they share a slot, else on the shard
        (SHARD_BLOCK_MS at most with several: jobs on the others wait)."""
        order, flex = self._in_turn()

        async def read(stream: JobStream, n: int) -> list[Delivery]:
            return await stream.read_new(n, block_ms=None)

        taken = await self._from_each([self.own, *order], count, read)
        room = count - len(taken) if flex_jobs is None else min(count - len(taken), flex_jobs)
        if room > 0:  # flex jobs only with the room on_demand ones leave
            try:
                taken += await self._from_each(flex, room, read)
            except RedisError:
                if not taken:
                    raise
        if taken or block_ms is None:
            return taken
        if len(self.shards) > 1:
            block_ms = min(block_ms, SHARD_BLOCK_MS)
        together = (
            [self.own, order[0]] if order[0].stream == keys.job_stream(self._model, self.home) else [order[0]]
        )
        return await read_together(
            self._redis, self._worker_id, [s.stream for s in together], count, block_ms
        )

    async def reclaim(self, count: int, min_idle_ms: int) -> list[Delivery]:
        """Jobs of workers that died: pending ones past the claim timeout, on the shards and on
        every worker's own stream; then undelivered ones on the own streams of workers gone."""
        theirs = await self._worker_streams()
        order, flex = self._in_turn()
        taken = await self._from_each(
            [*order, *theirs, *flex],  # a dead worker's on_demand jobs before flex ones
            count,
            lambda stream, n: stream.reclaim(n, min_idle_ms),
        )
        live = self.live_workers
        gone = [s for s in theirs if live is not None and _owner(s.stream) not in live]
        if len(taken) < count and gone:
            taken += await self._from_each(
                gone, count - len(taken), lambda stream, n: stream.read_new(n, None)
            )
        # (Undelivered flex jobs need no such read: their lane is shared, any worker reads it.)
        return taken

    async def _worker_streams(self) -> list[JobStream]:
        """The own streams of every worker of the model, ours included (the sets of all shards).
        A shard that does not answer adds none (its shard stream's reclaim reports the error)."""
        found: list[JobStream] = []
        for shard in range(len(self.shards)):
            try:
                names = await self._redis.smembers(keys.worker_streams(self._model, shard))
            except RedisError:
                continue
            for raw in sorted(names):
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                if name not in self._by_name:
                    self._by_name[name] = JobStream(self._redis, self._model, self._worker_id, stream=name)
                found.append(self._by_name[name])
        return found

    async def _from_each(
        self,
        order: list[JobStream],
        count: int,
        take: Callable[[JobStream, int], Awaitable[list[Delivery]]],
    ) -> list[Delivery]:
        """Up to count deliveries taken from the streams in order. A stream that fails is skipped
        (what the others delivered is kept: those jobs are ours now); raises only if all failed."""
        taken: list[Delivery] = []
        errors: list[RedisError] = []
        for shard in order:
            if len(taken) >= count:
                break
            try:
                taken += await take(shard, count - len(taken))
            except RedisError as exc:
                log.warning("job stream %s unavailable: %s", shard.stream, exc)
                errors.append(exc)
                # Another worker's stream is gone: leave it.
                ours = shard is self.own or shard in self.shards or shard in self.flex
                if ours and isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    with contextlib.suppress(RedisError):
                        await shard.ensure_group()  # its Redis lost its data: start it over
        if errors and len(errors) == len(order) and not taken:
            raise errors[0]
        return taken

    async def forget_dead_consumers(self, claim_idle_ms: int) -> list[str]:
        """Removes consumers of workers gone for good, and their own streams once empty."""
        forgotten: list[str] = []
        for shard in [*self.shards, *self.flex, self.own]:
            with contextlib.suppress(RedisError):  # tried again at the next round
                forgotten += await shard.forget_dead_consumers(claim_idle_ms)
        live = self.live_workers
        if live is None:
            return forgotten
        drop = self._redis.register_script(_DROP_WORKER_STREAM)
        # Only streams whose worker was gone at the previous round too: a worker that just started
        # lists its stream before the registry (and our view of it) says it lives.
        gone_before, self._gone = self._gone, set()
        for stream in await self._worker_streams():
            owner = _owner(stream.stream)
            if owner in live or stream is self.own:
                continue
            self._gone.add(stream.stream)
            if stream.stream not in gone_before:
                continue
            with contextlib.suppress(RedisError):
                listed_in = keys.worker_streams(self._model, keys.shard_of(stream.stream))
                if await drop(keys=[stream.stream, listed_in], args=[keys.WORKER_GROUP]):
                    log.info("removed the job stream of worker %s, gone", owner)
                    # Kept in _by_name while a delivery of ours may still name it (its jobs end there).
        return forgotten

    async def heartbeat(self, deliveries: list[Delivery]) -> set[tuple[str, bytes]]:
        """Marks our running jobs as alive; returns the keys (key()) of those still ours. A job on
        a stream whose heartbeat failed counts as ours: that cannot be told, and stopping it
        would throw away work that is most likely still ours."""

        async def beat(stream: JobStream, mine: list[bytes]) -> set[tuple[str, bytes]]:
            try:
                owned = await stream.heartbeat(mine)
            except RedisError as exc:
                log.warning("heartbeat on %s failed: %s", stream.stream, exc)
                owned = set(mine)
            return {(stream.stream, entry_id) for entry_id in owned}

        beats = await asyncio.gather(*(beat(stream, mine) for stream, mine in self._by_stream(deliveries)))
        return set().union(*beats)

    async def hand_back(self, deliveries: list[Delivery]) -> None:
        """Makes our unfinished jobs claimable by other workers at once; raises the first error
        after trying every stream."""
        errors: list[RedisError] = []
        for stream, mine in self._by_stream(deliveries):
            try:
                await stream.hand_back(mine)
            except RedisError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _by_stream(self, deliveries: list[Delivery]) -> list[tuple[JobStream, list[bytes]]]:
        """The entry ids of deliveries grouped by their stream."""
        grouped: dict[str, list[bytes]] = {}
        for delivery in deliveries:
            grouped.setdefault(self.of(delivery).stream, []).append(delivery.entry_id)
        return [(self._by_name[name], ids) for name, ids in grouped.items()]


def _owner(worker_stream: str) -> str:
    """The worker whose own stream it is (keys.worker_stream: ...:w:<worker id>)."""
    return worker_stream.rpartition(":w:")[2]
