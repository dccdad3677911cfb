"""Placed jobs on their way through Redis (gateway/queue.py _PLACE and _MOVE, worker/jobs.py's
own streams), against a real redis-server: a job goes to the worker that ran its prefix, is moved
to the shared stream when that worker does not take it within the delay, and is never stranded
by a worker that died."""

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from common import engine_registry, keys
from gateway.placement import Placement
from gateway.queue import JobQueue
from gateway.subscription import Subscription
from gateway.validation import ValidRequest
from tests.unit.queue_helpers import deadline, valid_request
from worker.jobs import ModelJobs, home_shard

BLOCK = 4


@dataclass
class Pool:
    """A gateway's queue and two workers' job streams of one model, the workers advertised."""

    queue: JobQueue
    placement: Placement
    w1: ModelJobs
    w2: ModelJobs
    request: ValidRequest

    @property
    def model(self) -> str:
        return self.request.model

    async def advertise(self, *workers: ModelJobs) -> None:
        for jobs in workers:
            load = engine_registry.WorkerLoad(jobs.own.stream, BLOCK, running=0, capacity=8)
            await engine_registry.advertise(
                self.queue._redis, self.model, jobs.own.stream.rpartition(":w:")[2], 4096, ttl=30, load=load
            )
        await self.queue.live_engines(self.model)  # the gateway's view, as its refresh makes it

    async def submit(self) -> Subscription:
        return await self.queue.submit(self.request, deadline())

    async def ran_on(self, subscription: Subscription, jobs: ModelJobs) -> None:
        """What the gateway does when the worker's Started event arrives."""
        assert subscription.affinity is not None
        self.placement.forget(subscription.request_id)
        await self.placement.record(self.model, subscription.affinity, jobs.own.stream.rpartition(":w:")[2])


async def pool_of(client: Redis, delay: float, **queue_options: Any) -> Pool:
    queue = JobQueue(client, client, f"gw-{uuid.uuid4().hex[:6]}", 1000, **queue_options)
    placement = queue.placement = Placement(client, epsilon=0.25, delay_seconds=delay)
    await queue.start()
    request = dataclasses.replace(valid_request(), prompt_token_ids=list(range(10)), prompt_cache_key="")
    w1, w2 = (ModelJobs(client, request.model, name) for name in ("w1", "w2"))
    for jobs in (w1, w2):
        await jobs.ensure_groups()
    pool = Pool(queue, placement, w1, w2, request)
    await pool.advertise(w1, w2)
    return pool


@pytest.fixture
async def pool(client: Redis) -> AsyncIterator[Pool]:
    pool = await pool_of(client, delay=60.0)  # nothing is moved in these tests unless they say so
    yield pool
    await pool.queue.stop()


async def test_a_prompt_goes_to_the_worker_that_ran_its_prefix(pool: Pool) -> None:
    first = await pool.submit()
    # Nobody ran it before: the worker holding the fewest conversations (a tie: the first by name).
    assert first.job_stream == pool.w1.own.stream
    [taken] = await pool.w1.read_new(8, block_ms=None)
    await pool.ran_on(first, pool.w1)

    second = await pool.submit()
    assert second.job_stream == pool.w1.own.stream
    assert await pool.w2.read_new(8, block_ms=None) == []  # not w2's
    [placed] = await pool.w1.read_new(8, block_ms=None)
    assert placed.request_id == second.request_id and placed.stream == pool.w1.own.stream
    for delivery in (taken, placed):  # ended as any job: entry, marker and cancel flag go
        assert await pool.w1.of(delivery).acknowledge(delivery)
    assert await pool.queue._redis.xlen(pool.w1.own.stream) == 0


async def test_the_callers_key_keeps_a_conversation_together(pool: Pool) -> None:
    pool.request = dataclasses.replace(pool.request, prompt_cache_key="conversation-1")
    first = await pool.submit()
    await pool.ran_on(first, pool.w2)
    pool.request = dataclasses.replace(pool.request, prompt_token_ids=list(range(50, 90)))  # another prompt
    assert (await pool.submit()).job_stream == pool.w2.own.stream


async def test_a_job_its_worker_does_not_take_within_the_delay_goes_to_any_worker(client: Redis) -> None:
    pool = await pool_of(client, delay=0.05)
    try:
        await pool.ran_on(await pool.submit(), pool.w1)
        await pool.w1.read_new(8, block_ms=None)  # the first job
        placed = await pool.submit()
        assert placed.job_stream == pool.w1.own.stream
        placed_entry = placed.entry_id
        await asyncio.sleep(0.3)  # w1 is busy (or frozen): it reads nothing
        assert placed.job_stream == keys.job_stream(pool.model) and placed.entry_id != placed_entry
        [moved] = await pool.w2.read_new(8, block_ms=None)
        assert moved.request_id == placed.request_id and moved.attempt == 1
        assert await pool.w1.read_new(8, block_ms=None) == []  # moved, not copied
        assert await client.get(keys.submitted(moved.stream, moved.request_id)) == placed.entry_id
        assert await pool.queue.fail_lost_jobs() == 0  # moved is not lost
    finally:
        await pool.queue.stop()


async def test_a_job_its_worker_took_stays_with_it(client: Redis) -> None:
    pool = await pool_of(client, delay=0.05)
    try:
        await pool.ran_on(await pool.submit(), pool.w1)
        placed = await pool.submit()
        assert len(await pool.w1.read_new(8, block_ms=None)) == 1 + 1  # the first job, then the placed one
        await asyncio.sleep(0.3)
        assert placed.job_stream == pool.w1.own.stream  # delivered: never moved
        assert await pool.w2.read_new(8, block_ms=None) == []
    finally:
        await pool.queue.stop()


async def test_a_job_cancelled_before_its_worker_took_it_is_dropped_not_moved(client: Redis) -> None:
    pool = await pool_of(client, delay=0.1)
    try:
        await pool.ran_on(await pool.submit(), pool.w1)
        placed = await pool.submit()
        assert placed.job_stream == pool.w1.own.stream
        pool.queue.release(placed, cancel_until=deadline())
        await asyncio.sleep(0.4)
        assert await client.xlen(pool.w1.own.stream) == 0
        assert not await client.exists(keys.cancel_flag(pool.w1.own.stream, placed.request_id))
        assert not await client.exists(keys.submitted(pool.w1.own.stream, placed.request_id))
    finally:
        await pool.queue.stop()


async def test_a_dead_workers_placed_jobs_are_taken_by_another(pool: Pool) -> None:
    await pool.ran_on(await pool.submit(), pool.w1)
    [first] = await pool.w1.read_new(8, block_ms=None)
    assert await pool.w1.of(first).acknowledge(first)
    delivered, waiting = await pool.submit(), await pool.submit()
    assert delivered.job_stream == waiting.job_stream == pool.w1.own.stream
    await pool.w1.read_new(1, block_ms=None)  # w1 took one, then died
    pool.w2.live_workers = frozenset({"w2"})  # as the registry says once w1's entry expired
    # Its delivered job once the claim timeout passed (0 here), its undelivered one at once.
    reclaimed = await pool.w2.reclaim(8, min_idle_ms=0)
    assert sorted(d.request_id for d in reclaimed) == sorted([delivered.request_id, waiting.request_id])
    by_id = {d.request_id: d for d in reclaimed}
    assert by_id[delivered.request_id].attempt == 2 and by_id[waiting.request_id].attempt == 1
    for delivery in reclaimed:  # ended on w1's stream, where they are
        assert delivery.stream == pool.w1.own.stream
        assert await pool.w2.of(delivery).acknowledge(delivery)
    # Once empty and gone for two rounds, the stream and its listing go: nothing is placed there.
    await pool.w2.forget_dead_consumers(claim_idle_ms=60_000)
    assert await pool.queue._redis.exists(pool.w1.own.stream)
    await pool.w2.forget_dead_consumers(claim_idle_ms=60_000)
    assert not await pool.queue._redis.exists(pool.w1.own.stream)
    assert not await pool.queue._redis.sismember(keys.worker_streams(pool.model, 0), pool.w1.own.stream)
    assert (await pool.submit()).job_stream == keys.job_stream(pool.model)  # the stale view places not


async def test_a_worker_whose_stream_holds_its_free_room_gets_no_more(pool: Pool) -> None:
    await pool.ran_on(await pool.submit(), pool.w1)
    await pool.w1.read_new(8, block_ms=None)
    pool.placement.epsilon = 10.0  # no bound on the share: only the room counts
    load = engine_registry.WorkerLoad(pool.w1.own.stream, BLOCK, running=6, capacity=8)  # 2 free
    await engine_registry.advertise(pool.queue._redis, pool.model, "w1", 4096, ttl=30, load=load)
    await pool.queue.live_engines(pool.model)
    placed = []
    for _ in range(3):
        # As if each came from another gateway, which knows nothing of the others' jobs: Redis
        # refuses a third job waiting on a worker with 2 free sequences.
        subscription = await pool.submit()
        pool.placement.forget(subscription.request_id)
        placed.append(subscription.job_stream)
    assert placed == [pool.w1.own.stream, pool.w1.own.stream, keys.job_stream(pool.model)]


async def test_the_gateways_view_counts_what_it_placed_until_the_next_heartbeat(pool: Pool) -> None:
    await pool.ran_on(await pool.submit(), pool.w1)
    await pool.w1.read_new(8, block_ms=None)
    # 0 + 0 running, then 1 + 0 (bound ceil(1.25 x 2 / 2) = 2), then 2 + 0: ceil(1.25 x 3 / 2) = 2.
    subscriptions = [await pool.submit() for _ in range(3)]
    assert [s.job_stream for s in subscriptions] == [pool.w1.own.stream] * 2 + [keys.job_stream(pool.model)]
    # Once a job has started, its worker's heartbeat counts it, and this gateway no more.
    pool.placement.forget(subscriptions[0].request_id)
    assert (await pool.submit()).job_stream == pool.w1.own.stream


async def test_a_move_run_again_after_its_reply_was_lost_gives_the_same_answer(client: Redis) -> None:
    pool = await pool_of(client, delay=60.0)
    try:
        await pool.ran_on(await pool.submit(), pool.w1)
        placed = await pool.submit()
        shared = keys.job_stream(pool.model)
        args = dict(
            keys=[
                placed.job_stream,
                shared,
                keys.submitted(placed.job_stream, placed.request_id),
                keys.cancel_flag(placed.job_stream, placed.request_id),
            ],
            args=[keys.WORKER_GROUP, placed.entry_id, keys.RETRY_MARKER_TTL_SECONDS],
        )
        moved = await pool.queue._move(**args)
        assert moved and await pool.queue._move(**args) == moved  # the client's retry of a timed-out call
    finally:
        await pool.queue.stop()


async def test_only_workers_on_shards_every_worker_reads_get_placed_jobs(client: Redis) -> None:
    # A rolling change of REDIS_JOB_STREAMS from 2 to 1: a job moved off a worker's stream lands on
    # that stream's shard, which the workers with 1 stream do not read.
    pool = await pool_of(client, delay=60.0)
    try:
        on_shard_1 = next(f"w{k}" for k in range(100) if home_shard(f"w{k}", 2) == 1)
        far = ModelJobs(client, pool.model, on_shard_1, shards=2)
        await far.ensure_groups()
        load = engine_registry.WorkerLoad(far.own.stream, BLOCK, running=0, capacity=8)
        await engine_registry.advertise(client, pool.model, on_shard_1, 4096, ttl=30, load=load)
        await pool.queue.live_engines(pool.model)  # every worker reads shard 0 only (the fewest)
        await pool.ran_on(await pool.submit(), far)
        # Not on the worker that ran it: on one of those whose streams are in shard 0's slot.
        assert (await pool.submit()).job_stream in (pool.w1.own.stream, pool.w2.own.stream)
    finally:
        await pool.queue.stop()


async def test_a_new_conversation_goes_to_the_worker_holding_the_fewest(pool: Pool) -> None:
    def conversation(k: int) -> ValidRequest:  # a prompt of 2 blocks no other conversation shares
        return dataclasses.replace(pool.request, prompt_token_ids=list(range(100 * k, 100 * k + 2 * BLOCK)))

    pool.request = conversation(1)  # w1 ran one conversation
    await pool.ran_on(await pool.submit(), pool.w1)
    pool.request = conversation(2)
    assert (await pool.submit()).job_stream == pool.w2.own.stream  # 0 against 1
    # w2 now holds one placed here that has not started: a tie, and w2 is the busier: w1.
    pool.request = conversation(3)
    assert (await pool.submit()).job_stream == pool.w1.own.stream

    # A later turn of conversation 1 run on w2 (spilled there) makes it w2's alone.
    later_turn = [*conversation(1).prompt_token_ids, 7, 7, 7, 7]
    pool.request = dataclasses.replace(pool.request, prompt_token_ids=later_turn)
    await pool.ran_on(await pool.submit(), pool.w2)
    assert await pool.queue._redis.zcard(keys.conversations(pool.model, "w1")) == 0
    assert await pool.queue._redis.zcard(keys.conversations(pool.model, "w2")) == 1
    assert await pool.queue._redis.ttl(keys.conversations(pool.model, "w2")) > 0


async def test_a_burst_of_new_conversations_holds_the_bound(pool: Pool) -> None:
    def conversation(k: int) -> ValidRequest:
        return dataclasses.replace(pool.request, prompt_token_ids=list(range(100 * k, 100 * k + 2 * BLOCK)))

    for k in range(1, 11):  # w1 ran ten: every new one goes to w2 while the bound lets it
        pool.request = conversation(k)
        await pool.ran_on(await pool.submit(), pool.w1)
    for jobs in (pool.w1, pool.w2):  # taken, wherever they were placed: the streams have room
        await jobs.read_new(16, block_ms=None)
    # Six at once, none started: with m placed before it, a job's bound is ceil(1.25 x (m + 1) / 2):
    # 1, 2, 2, 3, 4, 4. So w2 takes 4 of them, and w1 the two that would take w2 past its bound.
    burst = [pool.queue.submit(conversation(k), deadline()) for k in range(11, 17)]
    streams = [s.job_stream for s in await asyncio.gather(*burst)]
    assert streams.count(pool.w2.own.stream) == 4 and streams.count(pool.w1.own.stream) == 2, streams


async def test_a_spilled_turn_leaves_its_conversation_where_it_was(pool: Pool) -> None:
    first = await pool.submit()
    await pool.ran_on(first, pool.w1)  # w1's conversation
    # w1 over its share of the load: the next turn spills (to the shared streams) and runs on w2.
    load = engine_registry.WorkerLoad(pool.w1.own.stream, BLOCK, running=6, capacity=8)
    await engine_registry.advertise(pool.queue._redis, pool.model, "w1", 4096, ttl=30, load=load)
    await pool.queue.live_engines(pool.model)
    pool.request = dataclasses.replace(pool.request, prompt_token_ids=[*range(10), 7, 7])  # 3 blocks
    spilled = await pool.submit()
    assert spilled.placed_as == "spilled" and spilled.affinity is not None
    pool.queue._ran_on(spilled, "w2")  # its Started event: the index is written in the background
    spilled_only = keys.prefix_index(pool.model, spilled.affinity.tag, spilled.affinity.digests[-1])
    for _ in range(100):
        if await pool.queue._redis.exists(spilled_only):
            break
        await asyncio.sleep(0.02)

    await pool.advertise(pool.w1, pool.w2)  # the moment passed
    # The next turn (4 blocks: digests of 1, 2 and 4) shares the first 2 with w1's turn.
    pool.request = dataclasses.replace(
        pool.request, prompt_token_ids=[*pool.request.prompt_token_ids, 8, 8, 8, 8]
    )
    assert (await pool.submit()).job_stream == pool.w1.own.stream  # back where its history is
    assert await pool.queue._redis.zcard(keys.conversations(pool.model, "w1")) == 1
    assert not await pool.queue._redis.exists(keys.conversations(pool.model, "w2"))
    # The prefix only the spilled turn ran (all of its 3 blocks) names w2, where it is cached.
    assert await pool.queue._redis.get(spilled_only) == b"w2"
