"""A model's jobs spread over REDIS_JOB_STREAMS streams (gateway/queue.py queues on one at random;
worker/jobs.py ModelJobs reads them all), against a real redis-server."""

import uuid
from collections import Counter

import pytest
from redis.asyncio import Redis

from common import engine_registry, keys
from gateway.errors import QueueFull
from gateway.queue import JobQueue
from tests.unit.queue_helpers import deadline, valid_request
from worker.jobs import SHARD_BLOCK_MS, ModelJobs

STREAMS = 3


async def queue_of(client: Redis, max_queued_jobs: int = 1000) -> JobQueue:
    queue = JobQueue(client, client, f"gw-{uuid.uuid4().hex[:6]}", max_queued_jobs, job_streams=STREAMS)
    await queue.start()
    return queue


async def test_jobs_spread_over_the_streams_and_every_one_is_read_in_order(client: Redis) -> None:
    queue = await queue_of(client)
    request = valid_request()
    jobs = ModelJobs(client, request.model, "worker-a", STREAMS)
    await jobs.ensure_groups()
    submitted = []
    for _ in range(30):
        subscription = await queue.submit(request, deadline())
        submitted.append(subscription)
        queue.release(subscription)
    per_stream = Counter(s.job_stream for s in submitted)
    assert set(per_stream) == {keys.job_stream(request.model, shard) for shard in range(STREAMS)}
    assert await queue.waiting_jobs(request.model) == 30  # the whole backlog, over all streams

    taken = []
    while len(taken) < 30:
        taken += await jobs.read_new(4, block_ms=None)
    assert sorted(d.request_id for d in taken) == sorted(s.request_id for s in submitted)
    for stream in per_stream:  # in queue order within each stream
        assert [d.request_id for d in taken if d.stream == stream] == [
            s.request_id for s in submitted if s.job_stream == stream
        ]
    # Reads take turns: the first reads of a burst do not all come from one stream.
    assert all(jobs.of(d).stream == d.stream for d in taken)
    assert await queue.waiting_jobs(request.model) == 0
    for delivery in taken:
        assert await jobs.of(delivery).acknowledge(delivery)
    assert sum([await client.xlen(keys.job_stream(request.model, shard)) for shard in range(STREAMS)]) == 0
    await queue.stop()


async def test_no_stream_starves_while_another_is_always_full(client: Redis) -> None:
    model = f"fair-{uuid.uuid4().hex[:6]}"
    jobs = ModelJobs(client, model, "worker-a", STREAMS)
    await jobs.ensure_groups()
    busy, quiet = jobs.shards[0].stream, jobs.shards[1].stream
    for i in range(50):
        await client.xadd(busy, {keys.REQUEST_ID_FIELD: f"busy-{i}".encode()})
    await client.xadd(quiet, {keys.REQUEST_ID_FIELD: b"quiet"})
    taken = []
    for _ in range(STREAMS):  # one read of one job from each stream in turn
        taken += await jobs.read_new(1, block_ms=None)
    assert "quiet" in [d.request_id for d in taken]


async def test_an_idle_reader_blocks_briefly_and_then_finds_a_job_on_another_stream(client: Redis) -> None:
    model = f"idle-{uuid.uuid4().hex[:6]}"
    jobs = ModelJobs(client, model, "worker-a", STREAMS)
    await jobs.ensure_groups()
    assert await jobs.read_new(1, block_ms=5000) == []  # blocked SHARD_BLOCK_MS, not 5 s
    assert SHARD_BLOCK_MS <= 100
    for shard in jobs.shards:
        await client.xadd(shard.stream, {keys.REQUEST_ID_FIELD: shard.stream.encode()})
    found = []
    for _ in range(STREAMS):
        found += await jobs.read_new(1, block_ms=5000)
    assert sorted(d.request_id for d in found) == sorted(s.stream for s in jobs.shards)


async def test_a_queue_is_full_only_when_all_its_streams_are_and_a_refusal_leaves_nothing(
    client: Redis,
) -> None:
    queue = await queue_of(client, max_queued_jobs=STREAMS)  # one job per stream
    request = valid_request()
    queued = [await queue.submit(request, deadline()) for _ in range(STREAMS)]  # whichever stream is drawn
    assert sorted(s.job_stream for s in queued) == [keys.job_stream(request.model, n) for n in range(STREAMS)]
    logs_before = {k async for k in client.scan_iter(f"{keys.PREFIX}:completion:*")}
    with pytest.raises(
        QueueFull, match=f"full \\({STREAMS} jobs waiting; this request would be #{STREAMS + 1} in line"
    ):
        await queue.submit(request, deadline())
    # The refused call's completion log is gone with it (under overload, refusals are many).
    assert {k async for k in client.scan_iter(f"{keys.PREFIX}:completion:*")} == logs_before
    for subscription in queued:
        queue.release(subscription)
    await queue.stop()


async def test_a_stream_that_fails_costs_only_its_own_jobs(client: Redis) -> None:
    model = f"broken-{uuid.uuid4().hex[:6]}"
    jobs = ModelJobs(client, model, "worker-a", STREAMS)
    await jobs.ensure_groups()
    for shard in jobs.shards:
        await client.xadd(shard.stream, {keys.REQUEST_ID_FIELD: shard.stream.encode()})
    # One stream loses its consumer group (as on a shard that restarted empty): its read fails,
    # which neither raises nor costs the jobs the other streams delivered in the same read.
    await client.xgroup_destroy(jobs.shards[1].stream, keys.WORKER_GROUP)
    taken = await jobs.read_new(STREAMS, block_ms=None)
    assert sorted(d.stream for d in taken) == sorted([jobs.shards[0].stream, jobs.shards[2].stream])
    # The failed read made the stream's group anew: its job is served by the next read.
    [late] = await jobs.read_new(STREAMS, block_ms=None)
    assert late.stream == jobs.shards[1].stream


async def test_a_stream_whose_heartbeat_fails_keeps_its_jobs(client: Redis) -> None:
    model = f"beat-{uuid.uuid4().hex[:6]}"
    jobs = ModelJobs(client, model, "worker-a", 2)
    await jobs.ensure_groups()
    for shard in jobs.shards:
        await client.xadd(shard.stream, {keys.REQUEST_ID_FIELD: shard.stream.encode()})
    taken = await jobs.read_new(2, block_ms=None)
    await client.delete(jobs.shards[0].stream)  # its heartbeat now fails (no such group)
    # That stream's jobs count as ours (that cannot be told; stopping them would waste them).
    assert await jobs.heartbeat(taken) == {jobs.key(d) for d in taken}


async def test_the_same_entry_id_on_two_streams_names_two_jobs(client: Redis) -> None:
    model = f"ids-{uuid.uuid4().hex[:6]}"
    a, b = ModelJobs(client, model, "worker-a", 2), ModelJobs(client, model, "worker-b", 2)
    await a.ensure_groups()
    for shard in a.shards:  # one entry id, on both streams
        await client.xadd(shard.stream, {keys.REQUEST_ID_FIELD: shard.stream.encode()}, id="5-1")
    taken = []
    for _ in range(2):
        taken += await a.read_new(2, block_ms=None)
    assert len(taken) == 2
    # worker-b takes over the job on stream 0 only.
    [reclaimed] = await b.shards[0].reclaim(count=1, min_idle_ms=0)
    assert reclaimed.stream == a.shards[0].stream
    owned = await a.heartbeat(taken)
    assert owned == {(a.shards[1].stream, b"5-1")}  # the other one is no longer ours


async def test_jobs_go_only_to_streams_every_live_worker_reads(client: Redis) -> None:
    # A gateway set to 3 streams, workers to 2 (a mistake, or a rolling change): a job on the third
    # would wait to its deadline. The workers say what they read; the gateway keeps to it.
    queue = await queue_of(client)
    request = valid_request()
    await engine_registry.advertise(client, request.model, "w-new", 4096, ttl=10, job_streams=3)
    await engine_registry.advertise(client, request.model, "w-old", 4096, ttl=10, job_streams=2)
    live = await queue.live_engines(request.model)
    assert live is not None and live.job_streams == 2
    streams = set()
    for _ in range(20):
        subscription = await queue.submit(request, deadline())
        streams.add(subscription.job_stream)
        queue.release(subscription)
    assert streams == {keys.job_stream(request.model, 0), keys.job_stream(request.model, 1)}
    # Once every worker reads all three, so does the gateway.
    await engine_registry.advertise(client, request.model, "w-old", 4096, ttl=10, job_streams=3)
    await queue.live_engines(request.model)
    for _ in range(30):
        subscription = await queue.submit(request, deadline())
        streams.add(subscription.job_stream)
        queue.release(subscription)
    assert keys.job_stream(request.model, 2) in streams
    await client.delete(keys.engines(request.model))
    await queue.stop()
