"""Writes job events to Redis, many per round trip, each with its job's progress record.

Runners call `publish()` without waiting. For each gateway a background task (its lane)
writes whatever has accumulated since its last round trip in one script call (the keys of
a gateway's jobs share its slot, common/keys.py), so an engine step that produces a token
for each of 100 jobs costs one round trip per gateway, not 100. Events keep their order
because a lane writes its batches one after another.

Each event updates its job's progress record (common/keys.py progress(), format in
common/codec.py) and is added to its completion log (keys.completion_log(), which resumed
streams read) in the same atomic step, so what a gateway can have read is exactly
what the record says: a worker that takes the job over continues from there. The
script also fences stale writers: an event whose attempt is no longer the job's
current one (a worker that froze and woke up after another took over) is dropped.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import codec, keys

log = logging.getLogger(__name__)

# KEYS: reply stream, progress record and completion log of each event. ARGV[1]: width of the
# record's attempt field; ARGV[2], ARGV[3]: the entry's field names; then 7 per event: request id, payload,
# attempt, record header, token ids to append, fresh, the record's time to live in ms (0:
# none). A fresh event (the first of an attempt that starts over) replaces the record, which
# then expires after the job's deadline, unless a newer attempt owns it; any other event
# updates it only while its attempt owns it, and only once: an event whose seq the record
# already has was written by this same call before its reply was lost (redis-py retries a
# command once), and appending its tokens again would corrupt the record. Log entries hold
# the payload alone (the log's key names the job). Returns the number of events dropped.
_PUBLISH = """
local width = tonumber(ARGV[1])
local dropped = 0
for i = 0, #KEYS / 3 - 1 do
  local reply_to, record, log = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local a = 4 + 7 * i
  local attempt, fresh = tonumber(ARGV[a + 2]), ARGV[a + 5] == '1'
  local current = tonumber(redis.call('GETRANGE', record, 0, width - 1))
  local owned = (fresh and (current == nil or current <= attempt)) or (not fresh and current == attempt)
  if owned and not fresh then
    local seq = tonumber(string.sub(ARGV[a + 3], width + 1, 2 * width))
    owned = seq > tonumber(redis.call('GETRANGE', record, width, 2 * width - 1))
  end
  if not owned then
    dropped = dropped + 1
  else
    if fresh then
      local ttl = tonumber(ARGV[a + 6])
      if ttl > 0 then
        redis.call('SET', record, ARGV[a + 3] .. ARGV[a + 4], 'PX', ttl)
      else
        redis.call('SET', record, ARGV[a + 3] .. ARGV[a + 4])
      end
    else
      redis.call('SETRANGE', record, 0, ARGV[a + 3])
      if ARGV[a + 4] ~= '' then redis.call('APPEND', record, ARGV[a + 4]) end
    end
    redis.call('XADD', reply_to, 'NOMKSTREAM', '*', ARGV[2], ARGV[a], ARGV[3], ARGV[a + 1])
    redis.call('XADD', log, 'NOMKSTREAM', '*', ARGV[3], ARGV[a + 1])
  end
end
return dropped
"""


# How long a batch that cannot be written is tried again, in all, before its events count as lost
# (their calls then end UNAVAILABLE at the gap): longer than a failover takes. Only errors that
# a failover or restart explains are tried again; others (a wrong key type) fail at once.
WRITE_RETRY_SECONDS = 5.0
_FIRST_RETRY_DELAY_SECONDS = 0.1
_TRANSIENT = (ConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError, ReadOnlyError)
_LANE_IDLE_SECONDS = 60.0


@dataclass(frozen=True)
class Progress:
    """How one event moves its job's progress record."""

    attempt: int
    seq: int  # the event's seq: the record's last_seq once written
    released_chars: int  # text published up to and including this event
    token_ids: tuple[int, ...] = ()  # tokens generated since the previous event
    fresh: bool = False  # the first event of an attempt that starts over: replaces the record
    deadline: float = 0.0  # the job's (Unix time; 0: none): the record expires a while after it


@dataclass(frozen=True)
class _Pending:
    reply_to: str
    request_id: str
    payload: bytes
    progress: Progress


class EventPublisher:
    """Writes events in batches, one lane per gateway: a lane writes its batches in order, one
    at a time, and lanes write side by side, so a gateway whose Redis node is slow or failing
    over (on Redis Cluster each gateway's keys are on one shard) holds back only its own jobs."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(_PUBLISH)
        self._lanes: dict[str, _Lane] = {}  # by reply stream
        self._running = False

    def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        if self._running:
            try:
                await self.flush()
            except RedisError as exc:
                log.error("events not written at stop: %s", exc)
            self._running = False
            lanes, self._lanes = list(self._lanes.values()), {}
            for lane in lanes:
                lane.task.cancel()
            await asyncio.gather(*(lane.task for lane in lanes), return_exceptions=True)

    def publish(self, reply_to: str, event: codec.Event, progress: Progress) -> asyncio.Future[None]:
        """Queues the event; returns the future of its batch: done once the batch is in Redis,
        with a RedisError if it could not be written."""
        lane = self._lanes.get(reply_to)
        if lane is None or lane.task.done():
            lane = self._lanes[reply_to] = _Lane(self._write_patiently, on_idle=self._forget_lane)
        return lane.add(_Pending(reply_to, event.request_id, codec.encode(event), progress))

    def _forget_lane(self, lane: "_Lane") -> None:
        for reply_to, known in list(self._lanes.items()):
            if known is lane:
                del self._lanes[reply_to]  # a gateway long gone (new ids on restart) leaves nothing

    async def flush(self) -> None:
        """Waits until everything published so far is in Redis, or known lost; raises the first
        RedisError of a batch that could not be written."""
        results = await asyncio.gather(
            *(lane.flush() for lane in list(self._lanes.values())), return_exceptions=True
        )
        if errors := [r for r in results if isinstance(r, BaseException)]:
            raise errors[0]

    async def _write_patiently(self, batch: list[_Pending]) -> None:
        """Writes one gateway's batch, trying again for up to WRITE_RETRY_SECONDS in all after an
        error that a failover or a restart explains (a replica promoted in 1-3 s): its streams
        stall instead of breaking. Writing an event twice changes nothing (the script drops what
        the record has, and a gateway drops an event whose seq it has)."""
        give_up = time.monotonic() + WRITE_RETRY_SECONDS
        delay = _FIRST_RETRY_DELAY_SECONDS
        while True:
            try:
                async with asyncio.timeout(max(0.1, give_up - time.monotonic())):
                    dropped = await self._write(batch)
                break
            except (TimeoutError, *_TRANSIENT) as exc:
                if time.monotonic() + delay > give_up:
                    if isinstance(exc, RedisError):
                        raise
                    raise RedisTimeoutError(f"events not written within {WRITE_RETRY_SECONDS:.0f}s") from exc
                log.warning("cannot write events (%s); trying again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
        if dropped:
            log.info("dropped %d events: of jobs another worker has taken over, or written already", dropped)

    async def _write(self, batch: list[_Pending]) -> int:
        """Writes events of one gateway's jobs in one script; returns how many it dropped."""
        script_keys: list[str] = []
        args: list[bytes | str | int] = [
            codec.PROGRESS_FIELD_WIDTH,
            keys.REQUEST_ID_FIELD,
            keys.PAYLOAD_FIELD,
        ]
        for e in batch:
            p = e.progress
            script_keys += [e.reply_to, keys.progress(e.request_id), keys.completion_log(e.request_id)]
            header = codec.encode_progress_header(p.attempt, p.seq, p.released_chars)
            args += [
                e.request_id,
                e.payload,
                p.attempt,
                header,
                codec.encode_token_ids(p.token_ids),
                int(p.fresh),
                _time_to_live_ms(p.deadline) if p.fresh else 0,  # only a fresh event sets it
            ]
        # NOMKSTREAM (in the script): a gateway that died has let its reply stream expire, and a
        # completion log past its retention window is gone for good; neither is made anew.
        return int(await self._script(keys=script_keys, args=args))


class _Lane:
    """One gateway's events: batches written one after another by a task of its own, which ends
    after _LANE_IDLE_SECONDS without events (gateways come and go)."""

    def __init__(
        self, write: Callable[[list[_Pending]], Awaitable[None]], on_idle: Callable[["_Lane"], None]
    ) -> None:
        self._write = write
        self._on_idle = on_idle
        self._batch: list[_Pending] = []
        self._batch_written: asyncio.Future[None] | None = None  # resolves when _batch is in Redis
        self._in_flight: asyncio.Future[None] | None = None  # the batch being written now
        self._wakeup = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name="event-lane")

    def add(self, event: _Pending) -> asyncio.Future[None]:
        if self._batch_written is None:
            self._batch_written = asyncio.get_running_loop().create_future()
            # Nobody may await this batch; mark a failure as seen so asyncio does not warn.
            self._batch_written.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._batch.append(event)
        self._wakeup.set()
        return self._batch_written

    async def flush(self) -> None:
        """Waits for the batch being written and the one queued after it; raises the first's
        error (the second's after the first has succeeded)."""
        for pending in (self._in_flight, self._batch_written):
            if pending is not None:
                await asyncio.shield(pending)

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(_LANE_IDLE_SECONDS):
                    await self._wakeup.wait()
            except TimeoutError:
                if not self._batch:
                    self._on_idle(self)
                    return  # publish() starts a new lane for the next event
            self._wakeup.clear()
            batch, written = self._batch, self._batch_written
            self._batch, self._batch_written, self._in_flight = [], None, written
            if written is None:
                continue
            try:
                await self._write(batch)
            except BaseException as exc:
                # Whatever went wrong, the batch's waiters hear it (a RedisError): nobody may wait
                # for ever for events that will not be written.
                lost = exc if isinstance(exc, RedisError) else RedisError(f"events not written: {exc!r}")
                log.error("lost %d events: %s", len(batch), lost)
                written.set_exception(lost)
                if isinstance(exc, asyncio.CancelledError) and self._batch_written is not None:
                    self._batch_written.set_exception(RedisError("the publisher stopped"))
                if not isinstance(exc, Exception):
                    raise
            else:
                written.set_result(None)
            finally:
                self._in_flight = None


# How long a progress record outlives its job's deadline. Nobody continues a job after its
# deadline; the margin covers clocks of gateway and worker that disagree a little. Records
# are deleted when their job is acknowledged; this bounds those that are not (a worker that
# wakes up after its job was finished elsewhere can still write its first event).
_RECORD_MARGIN_SECONDS = 60.0


def _time_to_live_ms(deadline: float) -> int:
    if not deadline:
        return 0
    return max(1000, int((deadline - time.time() + _RECORD_MARGIN_SECONDS) * 1000))
