"""A model's jobs spread over REDIS_JOB_STREAMS streams (gateway/queue.py queues on one at random;
worker/jobs.py ModelJobs reads them all), against a real redis-server."""

import uuid
from collections import Counter

from redis.asyncio import Redis

from common import keys
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


async def test_a_full_queue_is_refused_with_the_models_backlog(client: Redis) -> None:
    queue = await queue_of(client, max_queued_jobs=STREAMS)  # one job per stream
    request = valid_request()
    queued = 0
    refused = None
    for _ in range(20):
        try:
            queue.release(await queue.submit(request, deadline()))
            queued += 1
        except Exception as exc:  # QueueFull once the stream drawn is full
            refused = exc
            break
    assert refused is not None and type(refused).__name__ == "QueueFull"
    assert queued <= STREAMS
    await queue.stop()
