"""The gateway's side of the Redis job queue: submit jobs, route their events back.

Each gateway process has one reply stream in Redis. Workers append the events of
all of this gateway's jobs to it, and one background task reads it with a blocking
XREAD and hands each event to the job's Subscription. One reader per process, not
one blocking read per request, keeps Redis connections and wake-ups independent of
the number of open streams. The reply stream expires unless the gateway keeps
touching it, so a dead gateway leaves nothing behind (workers write with NOMKSTREAM)
and workers abort the jobs of a gateway whose reply stream is gone.
"""

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, NoScriptError, OutOfMemoryError, RedisError

from common import codec, engine_registry, keys, streams
from common.redis_client import on_node_of
from common.supervise import being_cancelled, supervised
from gateway import metrics, placement
from gateway.completion_log import CallRecord
from gateway.errors import FlexCapacityExceeded, QueueFull, RedisOutOfMemory, ServiceError, Unavailable
from gateway.placement import Placement
from gateway.presence import WorkerPresence
from gateway.subscription import Subscription
from gateway.tiers import FLEX, ON_DEMAND, TIER_PRIORITY
from gateway.tools import ToolUse
from gateway.validation import ValidRequest
from gateway.wait_estimate import WaitEstimator

log = logging.getLogger(__name__)


REPLY_STREAM_TTL_SECONDS = 10  # workers treat a missing reply stream as a dead gateway
LOST_JOB_CHECK_SECONDS = 2.0  # default of how often waiting calls' jobs are looked for in Redis
_KEEPALIVE_SECONDS = 2
_TRIM_EVERY_SECONDS = 1.0

# Queues a job unless the model already has `limit` jobs waiting (queued, not yet taken).
# Returns the entry id, or the number waiting when full. Atomic, so concurrent gateways
# cannot overshoot the limit together.
_WAITING = """
local waiting = redis.call('XLEN', KEYS[1])
if waiting > 0 then
  local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
  if ok then waiting = waiting - pending[1] end
end
"""
# A submit is two steps, because its keys live in two slots on Redis Cluster (common/keys.py):
# the call's keys in its gateway's slot, the job in its queue's. Each step is atomic and
# idempotent, and they run in this order, so a crash or lost reply between them loses nothing
# and repeats nothing: a call opened whose job was never queued has told nobody its id, and its
# log expires; run again, each step finds its own work done.
#
# Step 1, _OPEN_CALL. KEYS: reply stream, completion log. ARGV: the call's record
# (gateway/completion_log.py), the log's time to live (ms). Returns 1, or _REPLY_STREAM_GONE:
# workers would drop the job's events (NOMKSTREAM), so nothing may be queued. The log is made
# before the job, so that every event of the job lands there too.
_REPLY_STREAM_GONE = -1
_OPEN_CALL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XADD', KEYS[2], '*', 'call', ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""
# Step 2, _QUEUE. KEYS: job stream, the request's submitted marker. ARGV: group, limit, marker
# TTL, 6 entry fields. Returns the entry id, or the number of jobs waiting when the queue is
# full. Run again (a retry after a reply timeout), it returns the entry it added the first time.
_ALREADY_QUEUED = """
local queued = redis.call('GET', KEYS[2])
if queued then return queued end
"""
_ADD = """
local id = redis.call('XADD', KEYS[1], '*', ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
redis.call('SET', KEYS[2], id, 'EX', ARGV[3])
return id
"""
_QUEUE = _ALREADY_QUEUED + _WAITING + "if waiting >= tonumber(ARGV[2]) then return waiting end\n" + _ADD
# Or step 2, _PLACE: the job on a worker's own stream (gateway/placement.py), as _QUEUE does but
# only while that stream is listed (its worker has not been removed for good) and holds fewer
# undelivered jobs than ARGV[2], the worker's free sequences as last known. KEYS: worker stream,
# submitted marker, the set of worker streams of its slot. Returns the entry id, or -1: the job
# goes to the shared streams instead.
_PLACE = (
    _ALREADY_QUEUED
    + "if redis.call('SISMEMBER', KEYS[3], KEYS[1]) == 0 then return -1 end\n"
    + _WAITING
    + "if waiting >= tonumber(ARGV[2]) then return -1 end\n"
    + _ADD
)
# Moves a placed job from its worker's stream to the shard stream of the same slot, if no worker
# has read it yet (its id is past the group's last-delivered id), so that any worker takes it;
# a job cancelled meanwhile is dropped instead. Atomic against the workers' reads: a job is
# either delivered where it was placed or moved, never both. KEYS: worker stream, shard stream,
# submitted marker, cancel flag. ARGV: group, entry id, marker TTL. Returns the new entry id, or
# false when the job was delivered, had ended, or was dropped.
_MOVE = """
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])[1]
if not entry then
  -- Moved already (this script run again after its reply was lost: the same answer), or ended.
  -- (The new id may equal the old one: ids are per stream.)
  local moved = redis.call('GET', KEYS[3])
  if moved and redis.call('XRANGE', KEYS[2], moved, moved)[1] then return moved end
  return false
end
local delivered = '0-0'
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, group in ipairs(groups) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    if info['name'] == ARGV[1] then delivered = info['last-delivered-id'] end
  end
end
local ems, eseq = string.match(ARGV[2], '^(%d+)-(%d+)$')
local dms, dseq = string.match(delivered, '^(%d+)-(%d+)$')
ems, eseq, dms, dseq = tonumber(ems), tonumber(eseq), tonumber(dms), tonumber(dseq)
if ems < dms or (ems == dms and eseq <= dseq) then return false end
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('DEL', KEYS[3], KEYS[4])
  return false
end
local id = redis.call('XADD', KEYS[2], '*', unpack(entry[2]))
redis.call('SET', KEYS[3], id, 'EX', ARGV[3])
return id
"""


# Sets a job's cancel flag only while its entry is still in the job stream: a worker deletes
# entry and flag together when the job ends, so a late cancel cannot leave a stray flag.
# KEYS: job stream, cancel flag, submitted marker. ARGV: entry id ('' when the submit's reply never
# came: then the marker says whether and where the job was queued), flag TTL.
_CANCEL = """
local id = ARGV[1]
if id == '' then id = redis.call('GET', KEYS[3]) end
if id and redis.call('XRANGE', KEYS[1], id, id)[1] then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
end
"""


# Makes the reply stream (a marker entry) with its time to live, in one step: never one that
# lives for ever. KEYS: reply stream. ARGV: TTL in seconds.
_CREATE_REPLY_STREAM = """
redis.call('XADD', KEYS[1], '*', 'created', '1')
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""


@dataclass(frozen=True)
class _QueueFull:
    waiting: int  # jobs waiting on all the model's streams


class JobQueue:
    def __init__(
        self,
        redis: Redis,
        reader: Redis,
        gateway_id: str,
        max_queued_jobs: int,
        log_window_seconds: float = 600.0,
        submit_replicas: int = 0,
        submit_wait_ms: int = 50,
        job_streams: int = 1,
    ) -> None:
        self._redis = redis
        self._log_window_seconds = log_window_seconds  # a completion log outlives its deadline so long
        self._reader = reader  # its own connection: the blocking XREAD holds it
        self._gateway_id = gateway_id
        self._max_queued_jobs = max_queued_jobs
        self.flex_max_queued_jobs = 100  # GATEWAY_FLEX_MAX_QUEUED_JOBS: the flex lanes' limit
        self._job_streams = job_streams  # REDIS_JOB_STREAMS: a job goes to one of them at random
        # Of a model's streams, how many every live worker reads (common/engine_registry.py): a
        # worker that reads fewer than this gateway's setting would leave jobs on the others.
        self._streams_read: dict[str, int] = {}
        self._submit_replicas = submit_replicas  # GATEWAY_SUBMIT_REPLICAS: 0 waits for none
        self._submit_wait_ms = submit_wait_ms
        self.lost_job_check_seconds = LOST_JOB_CHECK_SECONDS  # GATEWAY_LOST_JOB_CHECK_SECONDS
        self._reply_stream = keys.reply_stream(gateway_id)
        self._open_call = redis.register_script(_OPEN_CALL)
        self._queue = redis.register_script(_QUEUE)
        self._place = redis.register_script(_PLACE)
        self._move = redis.register_script(_MOVE)
        self.placement: Placement | None = None  # GATEWAY_CACHE_AFFINITY: None places no job
        self._waiting = redis.register_script(_WAITING + "return waiting")
        self._cancel_script = redis.register_script(_CANCEL)
        self._create_reply_stream = redis.register_script(_CREATE_REPLY_STREAM)
        self._subscriptions: dict[str, Subscription] = {}
        # Bumped each time the reply stream is found gone and made anew (every call waiting then
        # is failed); a lock makes one caller do it for everybody who noticed.
        self._generation = 0
        self._renewing = asyncio.Lock()
        self._reader_ok = True  # the reply stream can be read (set through _relay_state)
        self._reply_stream_ok = True  # and kept from expiring
        # Set whenever can_relay changes, so that health follows at once rather than at its next tick.
        self.relay_state_changed = asyncio.Event()
        self.read_through = b"0-0"  # the reply stream's last entry the reader has routed
        self._check_jobs_now = asyncio.Event()  # set when Redis may have lost data (reader recovered)
        self.presence: WorkerPresence | None = None  # None: queue whether or not a worker is live
        # What a refusal for a full queue says of the wait (fed by the relay and the health tick).
        self.waits = WaitEstimator()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._moves: set[asyncio.Task[None]] = set()  # placed jobs waiting for their delay

    async def start(self) -> None:
        await self._touch_reply_stream()
        self._tasks = [
            supervised("reply-reader", self._read_replies),
            supervised("reply-keepalive", self._keep_reply_stream),
            supervised("lost-jobs", self._watch_jobs),
        ]

    async def stop(self) -> None:
        moves = list(self._moves)  # placed jobs not moved stay where they are: their workers take them
        for task in [*self._tasks, *moves]:
            task.cancel()
        await asyncio.gather(*self._tasks, *moves, *self._background, return_exceptions=True)
        with contextlib.suppress(RedisError):  # it expires on its own otherwise
            await self._redis.delete(self._reply_stream)

    async def waiting_jobs(self, model: str, lane: Callable[[str, int], str] = keys.job_stream) -> int:
        """Jobs of the model that no worker has taken yet, on all its streams of one lane: the
        on_demand streams (keys.job_stream) or the flex ones (keys.flex_stream)."""
        counts = await asyncio.gather(
            *(
                self._waiting(keys=[lane(model, shard)], args=[keys.WORKER_GROUP])
                for shard in range(self._job_streams)
            )
        )
        return sum(int(n) for n in counts)

    async def live_engines(self, model: str) -> engine_registry.LiveEngines | None:
        """What the model's live workers can all take (None: no worker is live). Remembers how
        many job streams they all read: jobs are queued on those only."""
        live = await engine_registry.live_engines(self._redis, model)
        if live is not None:
            self._streams_read[model] = live.job_streams
        if self.placement is not None:
            self.placement.observe(model, live)
        return live

    async def generated_tokens(self, request_id: str) -> int:
        """Tokens the job's workers have generated and published so far, from its progress record
        (0 once the job has ended and its record is gone, or when Redis cannot tell)."""
        try:
            size = int(await self._redis.strlen(keys.progress(request_id)))
        except RedisError:
            return 0
        return max(0, size - codec.PROGRESS_HEADER_BYTES) // codec.PROGRESS_TOKEN_BYTES

    @property
    def can_relay(self) -> bool:
        """False while the reply stream cannot be read or kept: events of jobs would not reach calls."""
        return self._reader_ok and self._reply_stream_ok

    def _relay_state(self, reader_ok: bool | None = None, reply_stream_ok: bool | None = None) -> None:
        """Records whether the reply stream can be read and kept; sets relay_state_changed when
        can_relay changes, so that health follows at once."""
        before = self.can_relay
        if reader_ok is not None:
            self._reader_ok = reader_ok
        if reply_stream_ok is not None:
            self._reply_stream_ok = reply_stream_ok
        if self.can_relay != before:
            self.relay_state_changed.set()

    async def submit(self, request: ValidRequest, deadline: float, owner: str = "anonymous") -> Subscription:
        """Queues a validated request; its events arrive on the returned Subscription.

        owner: whose completion it is (an API key's digest): only that key may read its log."""
        if self.presence is not None:
            await self.presence.admit(request.model, deadline)  # no live worker: refused or held
        for _ in range(2):
            generation = self._generation
            subscription = await self._submit_once(request, deadline, owner)
            if subscription is not None:
                return subscription
            try:
                await self._renew_reply_stream(generation, "this gateway's reply stream was gone")
            except RedisError as exc:
                raise Unavailable.hiding("job queue unreachable", exc) from exc
        raise Unavailable("this gateway cannot keep its reply stream in Redis; retry the request")

    async def _submit_once(self, request: ValidRequest, deadline: float, owner: str) -> Subscription | None:
        """Queues the job, or returns None when the reply stream is gone (nothing queued)."""
        request_id = keys.new_request_id(self._gateway_id)
        job = codec.Job(
            request_id=request_id,
            model=request.model,
            prompt_token_ids=request.prompt_token_ids,
            sampling=codec.SamplingParams(
                temperature=request.temperature,
                top_p=request.top_p,
                max_tokens=request.max_tokens,
                # Always seeded: a job taken over samples its continuation from a seed derived from this.
                seed=request.seed if request.seed is not None else secrets.randbits(63),
                stop=request.stop,
                json_mode=request.json_mode,
                json_schema=request.json_schema,
                frequency_penalty=request.frequency_penalty,
                presence_penalty=request.presence_penalty,
                logprobs=request.logprobs,
                top_logprobs=request.top_logprobs,
                n=request.n,
                tools=_tool_use(request.tools),
            ),
            enqueued_at=time.time(),
            deadline=deadline,
            reply_to=self._reply_stream,
            gateway_id=self._gateway_id,
            trace_context=dict(request.trace_context),
            priority=TIER_PRIORITY[request.service_tier],
        )
        # The most the job can generate: what the call's charge is capped at.
        subscription = Subscription(request_id, request.model, request.max_tokens * request.n)
        subscription.service_tier = request.service_tier
        if self.placement is not None and request.service_tier == ON_DEMAND:  # flex has its own lane
            caller_key = request.prompt_cache_key or request.user
            subscription.affinity = self.placement.affinity(
                request.model, request.prompt_token_ids, caller_key
            )
        subscription.deadline = deadline
        subscription.choices = request.n
        subscription.created = int(time.time())
        record = CallRecord(
            request_id, owner, request.model, subscription.created, deadline, request.n, request.service_tier
        )
        log_ttl_ms = int((deadline - time.time() + self._log_window_seconds) * 1000)
        self._subscriptions[request_id] = subscription  # before XADD: no event can be missed
        fields = (
            keys.REQUEST_ID_FIELD, request_id.encode(),
            keys.REPLY_TO_FIELD, self._reply_stream.encode(),
            keys.PAYLOAD_FIELD, codec.encode(job),
        )  # fmt: skip
        submitting = asyncio.ensure_future(
            self._queue_job(subscription, [record.to_json(), max(1000, log_ttl_ms)], fields)
        )
        try:
            # Shielded: a caller that leaves meanwhile must not hide whether the job was queued.
            added = await asyncio.shield(submitting)
        except BaseException as exc:
            # Cancelled, past its deadline, or no reply from Redis: the job may be queued all the
            # same, and nobody waits for it any more.
            self._subscriptions.pop(request_id, None)
            if self.placement is not None:
                self.placement.forget(request_id)
            self._in_background(self._cancel_unconfirmed(submitting, subscription, deadline))
            if isinstance(exc, OutOfMemoryError):
                raise RedisOutOfMemory("cannot queue the job") from exc
            if isinstance(exc, RedisError):
                raise Unavailable.hiding("job queue unreachable", exc, request_id) from exc
            raise
        if isinstance(added, _QueueFull):
            self._subscriptions.pop(request_id, None)
            # Flex jobs also wait for on_demand ones: for them the estimate is a lower bound.
            wait = self.waits.wait_seconds(request.model, added.waiting + 1)
            if request.service_tier == FLEX:
                raise FlexCapacityExceeded(request.model, added.waiting, wait)
            raise QueueFull(request.model, added.waiting, wait)
        if added == _REPLY_STREAM_GONE:
            self._subscriptions.pop(request_id, None)
            return None
        subscription.entry_id = added
        self._relay_state(reply_stream_ok=True)  # the script found the reply stream there
        if self.placement is not None and keys.is_worker_stream(subscription.job_stream):
            move = asyncio.create_task(self._move_unless_taken(subscription, self.placement.delay_seconds))
            self._moves.add(move)
            move.add_done_callback(self._moves.discard)
        return subscription

    async def _queue_job(self, subscription: Subscription, call: list[Any], fields: tuple[bytes, ...]) -> Any:
        """Opens the call, then queues its job (see _OPEN_CALL) on one of the model's streams,
        drawn at random; one that is full passes the job to the next. Sets the subscription's
        job_stream to the stream it is queued on (or being tried: the caller may leave meanwhile,
        and a cancel must go there). Returns the entry id; _REPLY_STREAM_GONE; or, when every
        stream is full, _QueueFull with the jobs waiting on them all (nothing is left behind)."""
        request_id, model = subscription.request_id, subscription.model
        log_key = keys.completion_log(request_id)
        if await self._open_call(keys=[self._reply_stream, log_key], args=call) == _REPLY_STREAM_GONE:
            return _REPLY_STREAM_GONE
        if (placed := await self._place_on_worker(subscription, fields)) is not None:
            return placed
        streams = self._streams_in_use(model)
        # Each stream takes its share of its lane's limit; jobs spread evenly over them.
        flex = subscription.service_tier == FLEX
        lane, limit = (
            (keys.flex_stream, self.flex_max_queued_jobs)
            if flex
            else (keys.job_stream, self._max_queued_jobs)
        )
        per_stream = -(-limit // streams)
        first = secrets.randbelow(streams)
        waiting = 0
        for i in range(streams):
            stream = subscription.job_stream = lane(model, (first + i) % streams)
            added = await self._queue_on(
                self._queue,
                [stream, keys.submitted(stream, request_id)],
                [keys.WORKER_GROUP, per_stream, keys.RETRY_MARKER_TTL_SECONDS, *fields],
            )
            if not isinstance(added, int):
                return added
            waiting += added
        with contextlib.suppress(RedisError):  # refused: the call's log goes (else it expires)
            await self._redis.delete(log_key)
        return _QueueFull(waiting)

    def _streams_in_use(self, model: str) -> int:
        """Of the model's job streams, how many jobs go to: this gateway's setting, or fewer when
        some live worker reads fewer (a rolling change of REDIS_JOB_STREAMS)."""
        return max(1, min(self._job_streams, self._streams_read.get(model, self._job_streams)))

    async def _place_on_worker(self, subscription: Subscription, fields: tuple[bytes, ...]) -> bytes | None:
        """Queues the job on the worker placement picks (gateway/placement.py): its entry id, or
        None when placement picks none or that worker's stream takes no more (then the shared
        streams get it). Counts the placement's outcome."""
        if self.placement is None or subscription.affinity is None:
            return None
        model = subscription.model
        # Only on a worker whose stream is in the slot of a shard every live worker reads: a job
        # moved off it lands on that shard (a rolling change of REDIS_JOB_STREAMS strands none).
        shards = self._streams_in_use(model)
        target, outcome = await self.placement.place(
            model, subscription.request_id, subscription.affinity, subscription.choices, shards
        )
        if target is not None:
            subscription.job_stream = target.stream  # a cancel from now on looks there
            try:
                added = await self._queue_on(
                    self._place,
                    [
                        target.stream,
                        keys.submitted(target.stream, subscription.request_id),
                        keys.worker_streams(model, keys.shard_of(target.stream)),
                    ],
                    [keys.WORKER_GROUP, target.room, keys.RETRY_MARKER_TTL_SECONDS, *fields],
                )
            except BaseException:
                self.placement.forget(subscription.request_id)
                raise
            if isinstance(added, bytes):
                self.placement.count(model, outcome)
                subscription.placed_as = outcome
                return added
            self.placement.forget(subscription.request_id)
            if outcome == placement.PREFERRED:
                outcome = placement.SPILLED  # its stream was full, or gone
        self.placement.count(model, outcome)
        subscription.placed_as = outcome
        return None

    async def _move_unless_taken(self, subscription: Subscription, delay: float) -> None:
        """After the delay, moves a placed job that its worker has not taken (busy, frozen, dead
        or draining) to the shared stream of its slot, where any worker takes it."""
        await asyncio.sleep(delay)
        if subscription.ran_on or subscription.done or not keys.is_worker_stream(subscription.job_stream):
            return
        placed, entry_id = subscription.job_stream, subscription.entry_id
        shared = keys.job_stream(subscription.model, keys.shard_of(placed))
        request_id = subscription.request_id
        subscription.moving = True  # the lost-job check must not take the moved entry for lost
        moved = None
        try:
            # Through _queue_on: a move writes the job anew, so it waits for replicas as a submit does.
            moved = await self._queue_on(
                self._move,
                [placed, shared, keys.submitted(placed, request_id), keys.cancel_flag(placed, request_id)],
                [keys.WORKER_GROUP, entry_id, keys.RETRY_MARKER_TTL_SECONDS],
            )
            if moved:
                subscription.job_stream, subscription.entry_id = shared, bytes(moved)
                if self.placement is not None:
                    self.placement.forget(request_id)
                    self.placement.count(subscription.model, placement.MOVED)
                subscription.placed_as = placement.MOVED
        except RedisError as exc:
            # Left where it is: its worker takes it, or, once that worker is no longer live, any other.
            log.warning("cannot move job %s off its worker's stream: %s", request_id, exc)
        finally:
            subscription.moving = False
        if moved and request_id not in self._subscriptions:
            # Released while it moved: a cancel sent meanwhile looked at the old entry.
            await self._cancel(subscription, subscription.deadline)

    async def _queue_on(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Runs _QUEUE, _PLACE or _MOVE: the entry id, or what says the stream takes no more. With
        GATEWAY_SUBMIT_REPLICAS, then waits (up to GATEWAY_SUBMIT_WAIT_MS) until that many
        replicas have the job, so that a failover right after the caller was told "queued" does
        not lose it. WAIT covers the writes of its own connection, so both go down one pipeline
        (one round trip). A job not replicated in time is queued all the same (counted): the
        lost-job check still ends its call if the primary loses it. (A submit run again after a
        lost reply finds its job queued and writes nothing, so its WAIT says nothing about that
        job: it counts as replicated.)"""
        if not self._submit_replicas:
            return await script(keys=keys, args=args)
        for attempt in range(3):
            # Down one connection in order (on Redis Cluster: the job stream's node, as WAIT has no
            # key of its own). Errors come back as results, so a failed WAIT keeps the job's id.
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                pipe.execute_command(
                    "WAIT", self._submit_replicas, self._submit_wait_ms, **on_node_of(self._redis, keys[0])
                )
                added, replicated = await pipe.execute(raise_on_error=False)
            if isinstance(added, NoScriptError):
                # A Redis that has not seen the script (restarted, or a replica just promoted): load
                # it and run again; the submitted marker makes a second run return the same job.
                await self._redis.script_load(script.script)
            elif not isinstance(added, ConnectionError) or attempt:
                break
            # else: a pipeline is not retried by the client itself (on a cluster, after a failover
            # its slot map is stale): once more, which reconnects; the marker makes it idempotent.
        if isinstance(added, Exception):
            raise added
        if isinstance(added, bytes) and (
            not isinstance(replicated, int) or replicated < self._submit_replicas
        ):
            metrics.UNREPLICATED_SUBMITS.inc()
        return added

    @property
    def num_subscriptions(self) -> int:
        """Calls waiting for events of their jobs."""
        return len(self._subscriptions)

    def release(self, subscription: Subscription, cancel_until: float | None = None) -> None:
        """Stops routing the job's events; with cancel_until, also tells workers to drop the job."""
        self._subscriptions.pop(subscription.request_id, None)
        if self.placement is not None:
            self.placement.forget(subscription.request_id)
        if cancel_until is not None:
            self._in_background(self._cancel(subscription, cancel_until))

    def _in_background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_unconfirmed(
        self, submitting: asyncio.Future[Any], subscription: Subscription, until: float
    ) -> None:
        """Cancels a job whose submit the caller did not see through, if it was queued."""
        with contextlib.suppress(Exception):
            added = await submitting
            if not isinstance(added, bytes):
                return  # refused: queue full
            subscription.entry_id = added
        if not subscription.job_stream:
            return  # the submit failed before it tried any stream: nothing was queued
        await self._cancel(subscription, until)  # no entry id: the submitted marker tells

    async def _cancel(self, subscription: Subscription, until: float) -> None:
        # The flag must outlive the job's wait in the queue; after its deadline the job is dropped anyway.
        ttl = max(1, int(until - time.time()) + 60)
        request_id = subscription.request_id
        try:
            await self._cancel_script(
                keys=[
                    subscription.job_stream,
                    keys.cancel_flag(subscription.job_stream, request_id),
                    keys.submitted(subscription.job_stream, request_id),
                ],
                args=[subscription.entry_id, ttl],
            )
        except RedisError as exc:
            log.warning("cannot cancel job %s: %s (its deadline still ends it)", subscription.request_id, exc)

    async def _read_replies(self) -> None:
        last_id = b"0-0"
        # The stream generation last_id was read in: a renewal since made the stream anew, and an
        # entry of the old one missing from it is no loss (the renewal already failed its calls).
        read_generation = self._generation
        last_trim = time.monotonic()
        broken = False
        while True:
            if being_cancelled():  # a cancel that redis-py swallowed during a read: stop all the same
                raise asyncio.CancelledError
            try:
                if broken:
                    last_id = await self._recover(last_id, read_generation)
                    broken = False
                    self._relay_state(reader_ok=True)  # answered: no need to wait for the blocking read's end
                    self._check_jobs_now.set()  # a restart may have lost jobs, not only events
                generation = self._generation
                reply = await self._reader.xread({self._reply_stream: last_id}, count=1024, block=1000)
                self._relay_state(reader_ok=True)
            except RedisError as exc:
                if being_cancelled():
                    raise
                if not broken:
                    log.warning("reply stream unreadable: %s", exc)
                broken = True
                self._relay_state(reader_ok=False)
                await asyncio.sleep(0.2)
                continue
            for entry_id, fields in streams.entries(reply):
                last_id, read_generation = entry_id, generation
                self._route(fields)
            self.read_through = last_id
            if reply and time.monotonic() - last_trim > _TRIM_EVERY_SECONDS:
                last_trim = time.monotonic()
                await self._trim(last_id)

    async def _recover(self, last_id: bytes, read_generation: int) -> bytes:
        """After a Redis outage: if our reply stream lost entries, fail every waiting call."""
        generation = self._generation
        if last_id == b"0-0" or await self._reader.xrange(self._reply_stream, last_id, last_id):
            return last_id
        if generation != read_generation:
            return b"0-0"  # renewed once already for this loss: every entry there is news
        await self._renew_reply_stream(generation, "the job queue restarted and lost this job's progress")
        return b"0-0"

    async def _renew_reply_stream(self, generation: int, why: str) -> None:
        """The reply stream is gone (expired, or Redis lost it): events of waiting calls may have
        been dropped, so each of them ends UNAVAILABLE; then the stream is made anew for new calls.
        Nothing happens if it was renewed since `generation` was read."""
        async with self._renewing:
            if generation != self._generation:
                return
            self._generation += 1
            lost, self._subscriptions = list(self._subscriptions.values()), {}
            log.error("%s; failing %d calls and creating it anew", why, len(lost))
            error = Unavailable(f"{why}, so events of this job may be lost; retry the request")
            for subscription in lost:
                subscription.fail(error)
            await self._touch_reply_stream()

    async def _watch_jobs(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_jobs_now.wait(), self.lost_job_check_seconds)
            self._check_jobs_now.clear()
            try:
                await self.fail_lost_jobs()
            except RedisError as exc:
                if being_cancelled():
                    raise
                log.warning("cannot look for lost jobs: %s", exc)

    async def fail_lost_jobs(self) -> int:
        """Ends UNAVAILABLE (retryable) every waiting call whose job Redis no longer holds.

        Redis with `appendfsync everysec` can come back from a crash without the writes of its
        last second: a job queued then is gone, and its call would wait to its deadline. A job's
        entry stays in its stream until its worker has published its last event, so an entry
        missing once the reader has routed every event written before the look means a lost job.
        Returns how many calls were ended.
        """
        now = time.time()
        # Where each job was when looked for: a placed job moved since (gateway/placement.py) is
        # elsewhere, not lost.
        waiting = [
            (s, s.job_stream, s.entry_id)
            for s in self._subscriptions.values()
            if s.entry_id and not s.done and not s.moving and s.deadline > now
        ]
        if not waiting:
            return 0
        generation = self._generation
        async with self._redis.pipeline(transaction=False) as pipe:  # job streams on any shard
            for _, stream, entry_id in waiting:
                pipe.xrange(stream, entry_id, entry_id, count=1)
            found = await pipe.execute()
        missing = [looked for looked, entries in zip(waiting, found, strict=True) if not entries]
        if not missing:
            return 0
        # Read after the entries were found missing: it covers every event their workers wrote
        # before deleting them.
        newest: Any = await self._redis.xrevrange(self._reply_stream, "+", "-", count=1)
        written = _stream_id(newest[0][0]) if newest else (0, 0)
        give_up = time.monotonic() + min(self.lost_job_check_seconds, LOST_JOB_CHECK_SECONDS)
        while _stream_id(self.read_through) < written and generation == self._generation:
            if time.monotonic() > give_up:
                return 0  # the reader is behind or broken: look again next time
            await asyncio.sleep(0.05)
        if generation != self._generation:
            return 0  # the reply stream was renewed, which ended those calls already
        lost = [
            s
            for s, stream, entry_id in missing
            if not s.done
            and not s.moving
            and (s.job_stream, s.entry_id) == (stream, entry_id)
            and s.request_id in self._subscriptions
        ]
        if lost:
            log.error("the job queue lost %d queued or running jobs (Redis restarted?)", len(lost))
        error = Unavailable("the job queue lost this job (Redis restarted); retry the request")
        for subscription in lost:
            subscription.fail(error)
        return len(lost)

    def _route(self, fields: dict[bytes, bytes]) -> None:
        payload = fields.get(keys.PAYLOAD_FIELD)
        if payload is None:
            return  # the marker entry that creates the stream
        try:
            event = codec.decode_event(payload)
        except codec.BadPayload as exc:
            request_id = fields.get(keys.REQUEST_ID_FIELD, b"").decode(errors="replace")
            log.error("malformed event for job %r: %s", request_id, exc)
            if (subscription := self._subscriptions.get(request_id)) is not None:
                subscription.fail(ServiceError("the worker sent a malformed event"))
            return
        subscription = self._subscriptions.get(event.request_id)
        if subscription is not None:
            if event.HasField("started"):
                self._ran_on(subscription, event.started.worker_id)
            subscription.deliver(event)

    def _ran_on(self, subscription: Subscription, worker_id: str) -> None:
        """A worker started the job: placement remembers that it holds the job's prefix now."""
        subscription.ran_on = worker_id
        if self.placement is not None:
            self.placement.forget(subscription.request_id)
        if self.placement is not None and subscription.affinity is not None:
            # A job spilled or moved off the worker that holds its conversation (over its share of
            # the load, or busy, for a moment) leaves the conversation there: its next turn goes
            # back to that worker's cache. Placed where it was preferred, or new: it is the worker's.
            takes_home = subscription.placed_as in (placement.PREFERRED, placement.UNMATCHED)
            record = self.placement.record(subscription.model, subscription.affinity, worker_id, takes_home)
            self._in_background(record)

    async def _trim(self, last_id: bytes) -> None:
        try:
            await self._redis.xtrim(self._reply_stream, minid=last_id, approximate=False)
        except RedisError as exc:
            log.warning("cannot trim reply stream: %s", exc)

    async def _touch_reply_stream(self) -> None:
        await self._create_reply_stream(keys=[self._reply_stream], args=[REPLY_STREAM_TTL_SECONDS])
        self._relay_state(reply_stream_ok=True)  # any renewal that worked, whoever made it

    async def _keep_reply_stream(self) -> None:
        while True:
            await asyncio.sleep(_KEEPALIVE_SECONDS)
            await self.refresh_reply_stream()

    async def refresh_reply_stream(self) -> None:
        """Keeps the reply stream from expiring; renews it if it already has.

        It expires when this process stops refreshing it for the TTL (frozen, swapped out, a
        long GC pause): workers then abort its jobs and drop their events. Noticed here at the
        first refresh after the pause, which the event loop runs as soon as it wakes up.
        """
        generation = self._generation
        try:
            if not await self._redis.expire(self._reply_stream, REPLY_STREAM_TTL_SECONDS):
                # Not unhealthy while it is made anew: calls are served meanwhile (a submit renews
                # it too), and health read then must not say NOT_SERVING. A renewal that fails is.
                await self._renew_reply_stream(
                    generation, "this gateway's reply stream expired while the gateway was unresponsive"
                )
            self._relay_state(reply_stream_ok=True)
        except RedisError as exc:
            self._relay_state(reply_stream_ok=False)
            log.warning("cannot refresh reply stream: %s", exc)


def _stream_id(entry_id: bytes) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition(b"-")
    return int(milliseconds), int(sequence or 0)


def _tool_use(tools: ToolUse | None) -> codec.ToolUse | None:
    if tools is None:
        return None
    return codec.ToolUse(
        definitions=tools.definitions_json,
        choice=tools.choice,
        function_name=tools.function_name,
        parallel=tools.parallel,
    )
