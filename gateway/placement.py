"""Cache-affine placement: the worker whose engine most likely holds a job's prompt prefix in its
prefix cache, unless that worker is loaded beyond its share (docs/cache-affinity.md).

A job's affinity is a list of digests, shortest prefix first: of the caller's key
(`prompt_cache_key`, else `user`) when one is given, then of the prompt's leading 1, 2, 4, 8, ...
whole KV cache blocks and of all its whole blocks, each digest chained over the blocks before it.
The key comes first, as the shortest match: a prompt's own prefixes, where a worker is known to
hold them, say more about its cache than the key does (many conversations may share one key).
Turn k + 1 of a conversation extends turn k's prompt, so it shares turn k's digests up to the
longest power of two of turn k's blocks; requests that share a system prompt share its digests.

The index in Redis maps a digest to the worker that last *ran* a job with it (written when the
job's Started event names the worker, not at placement: a moved or reclaimed job ran elsewhere),
so every gateway replica places alike. Placement takes the worker of the longest digest found,
unless it would then run more than ceil((1 + epsilon) x (m + n) / N) sequences, m being the
sequences running on the N placement-aware live workers and n the job's (consistent hashing with
bounded loads): then the next longest match under the bound, else any worker (the shared
streams). Loads are the workers' own, from their heartbeats (common/engine_registry.py), plus
what this gateway placed since it last read them.

A prompt no live worker is known to hold (a new conversation) goes to the worker under the bound
that holds the fewest conversations (a sorted set per worker in Redis, keys.conversations), so
the pool's caches fill evenly: left to whichever worker reads it first, one worker can end up
with more conversations than its cache holds while another's has room, and then evicts them.
"""

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
from array import array
from collections import Counter
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common import engine_registry, keys
from common.engine_registry import LiveEngines, WorkerLoad
from gateway import metrics

log = logging.getLogger(__name__)

# How long the index remembers which worker ran a prefix: about as long as an engine under load
# keeps an idle conversation's blocks; a stale entry costs one placement on a worker that evicted it.
INDEX_TTL_SECONDS = 600
_DIGEST_BYTES = 8
# How old the workers' loads may be when a job is placed: they change at every heartbeat (0.5 s).
VIEW_SECONDS = 0.25

# Outcomes of a placement (chat_gateway_placements_total's label, gateway/metrics.py): on the
# worker that ran the longest matching prefix; elsewhere, as that one was over its share or full;
# on the worker holding the fewest conversations (else anywhere), as no candidate worker is known
# to hold the prefix; moved, as not taken within the delay.
PREFERRED, SPILLED, UNMATCHED, MOVED = metrics.PLACEMENT_OUTCOMES


@dataclass(frozen=True)
class Affinity:
    """What a job's placement looks up, and records once a worker runs it."""

    tag: str  # hash tag of its index keys (common/keys.py prefix_index): one slot per conversation
    digests: tuple[str, ...]  # shortest prefix first
    # The digest of the prompt's first block (else of the key): the conversation it belongs to, as
    # the workers' counts of conversations (keys.conversations) know it.
    conversation: str


@dataclass(frozen=True)
class Target:
    """A worker a job is placed on."""

    worker_id: str
    stream: str  # its own job stream
    room: int  # jobs its stream may hold undelivered: its free sequences as last known here
    outcome: str  # PREFERRED, SPILLED (to a shorter match), or UNMATCHED (balance)


def affinity_of(token_ids: list[int], block_size: int, caller_key: str = "") -> Affinity | None:
    """The job's affinity: the digests of the prompt's whole blocks, after that of caller_key
    when given (the shortest match: it places a prompt none of whose prefixes a worker is known to
    hold, the first turn of a conversation under a key for one); None when there is neither."""
    digests: list[str] = []
    if caller_key:
        digests.append(hashlib.blake2b(b"key\0" + caller_key.encode(), digest_size=_DIGEST_BYTES).hexdigest())
    blocks = len(token_ids) // block_size if block_size > 0 else 0
    chain = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for block in range(blocks):
        chain.update(array("I", token_ids[block * block_size : (block + 1) * block_size]).tobytes())
        covered = block + 1
        if covered & (covered - 1) == 0 or covered == blocks:  # a power of two, or all of them
            digests.append(chain.hexdigest())
    # One slot for all of them, so one MGET reads them: the key's, else the first block's (the
    # keys of one conversation, which all begin with it).
    if not digests:
        return None
    conversation = digests[1] if caller_key and len(digests) > 1 else digests[0]
    return Affinity(digests[0], tuple(digests), conversation)


def _bound(loads: dict[str, WorkerLoad], sequences: int, epsilon: float) -> int:
    """The most sequences a worker may run after taking a job of `sequences`."""
    running = sum(load.running for load in loads.values())
    return math.ceil((1 + epsilon) * (running + sequences) / max(1, len(loads)))


def _fits(load: WorkerLoad, sequences: int, bound: int) -> bool:
    after = load.running + sequences
    return after <= bound and after <= load.capacity


def choose(
    matches: list[str | None], loads: dict[str, WorkerLoad], sequences: int, epsilon: float
) -> tuple[Target | None, str]:
    """Where a job goes: matches are the workers the index names for its digests, shortest prefix
    first (None where it names none). Returns the target (None: the shared streams) and the
    outcome: UNMATCHED (and no target) when no live worker is named, a dead one's cache being
    gone with it."""
    found = list(dict.fromkeys(worker for worker in reversed(matches) if worker in loads))
    if not found:
        return None, UNMATCHED
    bound = _bound(loads, sequences, epsilon)
    for worker in found:
        if _fits(load := loads[worker], sequences, bound):
            outcome = PREFERRED if worker == found[0] else SPILLED
            return Target(worker, load.stream, load.capacity - load.running, outcome), outcome
    return None, SPILLED


def balance(
    loads: dict[str, WorkerLoad], conversations: dict[str, int], sequences: int, epsilon: float
) -> Target | None:
    """Where an unmatched job (a new conversation) goes: the worker under the bound that holds
    the fewest conversations, then the least loaded; None (the shared streams) when none fits."""
    bound = _bound(loads, sequences, epsilon)
    fitting = [worker for worker, load in loads.items() if _fits(load, sequences, bound)]
    if not fitting:
        return None
    worker = min(fitting, key=lambda w: (conversations.get(w, 0), loads[w].running, w))
    load = loads[worker]
    return Target(worker, load.stream, load.capacity - load.running, UNMATCHED)


@dataclass(frozen=True)
class _Placed:
    """A job this gateway placed that has not started yet."""

    model: str
    worker_id: str
    sequences: int
    new_conversation: bool  # placed as UNMATCHED: the worker will hold one conversation more


class Placement:
    """Places jobs of each model on its workers (GATEWAY_CACHE_AFFINITY): reads the workers'
    loads from the engine registry, the index from Redis, and records who ran what.

    A worker's load is what its last heartbeat said (read again when older than VIEW_SECONDS),
    plus the jobs this gateway placed on it that it has not started yet: those its heartbeat
    cannot count, and without them a burst would all go to one worker between two reads."""

    def __init__(self, redis: Redis, epsilon: float, delay_seconds: float) -> None:
        self._redis = redis
        self.epsilon = epsilon  # GATEWAY_AFFINITY_EPSILON
        self.delay_seconds = delay_seconds  # GATEWAY_AFFINITY_DELAY_MS
        self._loads: dict[str, dict[str, WorkerLoad]] = {}  # model -> worker id -> load
        self._read_at: dict[str, float] = {}  # model -> when its loads were read (monotonic)
        self._placed: dict[str, _Placed] = {}  # request id -> the job, until it starts

    def observe(self, model: str, live: LiveEngines | None) -> None:
        """The model's live workers as the registry says now."""
        self._loads[model] = dict(live.loads) if live is not None else {}
        self._read_at[model] = time.monotonic()

    def affinity(self, model: str, token_ids: list[int], caller_key: str) -> Affinity | None:
        """The job's affinity, or None where placement has no choice to make (fewer than two
        placement-aware workers live: one worker serves as today)."""
        loads = self._loads.get(model, {})
        if len(loads) < 2:
            return None
        return affinity_of(token_ids, min(load.block_size for load in loads.values()), caller_key)

    async def place(
        self, model: str, request_id: str, affinity: Affinity, sequences: int, shards: int = 1
    ) -> tuple[Target | None, str]:
        """The worker the job goes to (None: the shared streams), and the outcome. Only workers
        whose own stream is in the slot of one of the first `shards` shards are candidates."""
        if time.monotonic() - self._read_at.get(model, 0.0) > VIEW_SECONDS:
            try:
                self.observe(model, await engine_registry.live_engines(self._redis, model))
            except RedisError as exc:
                log.warning("cannot read the workers' loads: %s", exc)
        # Both reads at once, whether or not the job turns out unmatched: no await may come
        # between reading this gateway's view and recording the job in it, or a burst of jobs
        # would all be placed on one view.
        matches, ran = await asyncio.gather(
            self._matches(model, affinity), self._conversations_ran(model, list(self._loads.get(model, {})))
        )
        heartbeats = self._loads.get(model, {})
        loads = {
            w: load for w, load in self._effective_loads(model).items() if keys.shard_of(load.stream) < shards
        }
        target, outcome = choose(matches, loads, sequences, self.epsilon)
        if outcome == UNMATCHED:
            new: Counter[str] = Counter(
                p.worker_id for p in self._placed.values() if p.model == model and p.new_conversation
            )
            held = {worker: ran.get(worker, 0) + new[worker] for worker in loads}
            target = balance(loads, held, sequences, self.epsilon)
        if target is not None:
            self._placed[request_id] = _Placed(model, target.worker_id, sequences, outcome == UNMATCHED)
            # What may wait on its stream: its free sequences as it said. Redis counts the jobs
            # waiting there, placed by any gateway (gateway/queue.py _PLACE).
            heartbeat = heartbeats[target.worker_id]
            target = dataclasses.replace(target, room=heartbeat.capacity - heartbeat.running)
        return target, outcome

    async def _matches(self, model: str, affinity: Affinity) -> list[str | None]:
        """The workers the index names for the job's digests, shortest prefix first."""
        index = [keys.prefix_index(model, affinity.tag, digest) for digest in affinity.digests]
        try:
            return [_text(w) for w in await self._redis.mget(index)]
        except RedisError as exc:
            log.warning("cannot read the placement index: %s", exc)
            return []

    async def _conversations_ran(self, model: str, workers: list[str]) -> dict[str, int]:
        """How many conversations each worker ran within the index's lifetime (place() adds the
        new ones placed here that have not started yet, so that a burst of them spreads before
        the workers' records say where they went)."""
        since = time.time() - INDEX_TTL_SECONDS
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for worker in workers:
                    pipe.zcount(keys.conversations(model, worker), since, "+inf")
                counts = await pipe.execute()
        except RedisError as exc:
            log.warning("cannot read the workers' conversations: %s", exc)
            return {}
        return {worker: int(count) for worker, count in zip(workers, counts, strict=True)}

    def _effective_loads(self, model: str) -> dict[str, WorkerLoad]:
        waiting: Counter[str] = Counter()
        for placed in self._placed.values():
            if placed.model == model:
                waiting[placed.worker_id] += placed.sequences
        return {
            worker: dataclasses.replace(load, running=load.running + waiting[worker])
            for worker, load in self._loads.get(model, {}).items()
        }

    def forget(self, request_id: str) -> None:
        """The job started (its worker's next heartbeat counts it; till then nothing does), moved,
        or ended."""
        self._placed.pop(request_id, None)

    @staticmethod
    def count(model: str, outcome: str) -> None:
        metrics.PLACEMENTS.labels(model, outcome).inc()

    async def record(self, model: str, affinity: Affinity, worker_id: str, takes_home: bool = True) -> None:
        """Remembers that worker_id runs (so caches) the job's prefixes, and counts its
        conversation as worker_id's alone. A job that does not take its conversation home
        (spilled or moved for a moment of load) names worker_id only for prefixes no worker is
        known to hold, and leaves the conversation where it was: measured, moving it on every
        spill left each spilled conversation's cache behind and a cold copy on the other worker
        (bench.affinity, 3 spills: 0.60-0.64 against the ceiling's 0.69)."""
        now = time.time()
        own = keys.conversations(model, worker_id)
        others = [keys.conversations(model, w) for w in self._loads.get(model, {}) if w != worker_id]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for digest in affinity.digests:
                    index = keys.prefix_index(model, affinity.tag, digest)
                    pipe.set(index, worker_id, ex=INDEX_TTL_SECONDS, nx=not takes_home)
                await pipe.execute()
            if not takes_home:
                return
            # In the model's slot, not the conversation's: a pipeline of its own.
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(own, {affinity.conversation: now})
                pipe.zremrangebyscore(own, "-inf", now - INDEX_TTL_SECONDS)
                pipe.expire(own, INDEX_TTL_SECONDS)  # a worker gone for good leaves no set behind
                for other in others:
                    pipe.zrem(other, affinity.conversation)
                await pipe.execute()
        except RedisError as exc:
            log.warning("cannot update the placement index: %s", exc)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
