"""Reclaiming the jobs of dead workers (worker/jobs.py) against a real redis-server."""

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from common import keys
from worker.jobs import DEAD_CONSUMER_CLAIM_TIMEOUTS, JobStream

CLAIM_IDLE_MS = 10_000
LIVE_JOBS = 300  # pending with a live worker, queued before the dead worker's job


async def pending_with(client: Redis, stream: str, consumer: str, jobs: int, idle_ms: int) -> list[bytes]:
    """Queues `jobs` jobs, delivers them to `consumer`, and makes them look `idle_ms` idle."""
    for i in range(jobs):
        await client.xadd(stream, {keys.REQUEST_ID_FIELD: f"{consumer}-{i}".encode()})
    reply = await client.xreadgroup(keys.WORKER_GROUP, consumer, {stream: ">"}, count=jobs)
    ids = [entry_id for entry_id, _fields in reply[0][1]]
    await client.xclaim(stream, keys.WORKER_GROUP, consumer, 0, ids, idle=idle_ms, justid=True)
    return ids


async def test_a_dead_workers_job_behind_many_live_ones_is_reclaimed_within_bounded_calls(
    client: Redis,
) -> None:
    model = f"reclaim-{uuid.uuid4().hex[:8]}"
    jobs = JobStream(client, model, "worker-new")
    await jobs.ensure_group()
    await pending_with(client, jobs.stream, "worker-live", LIVE_JOBS, idle_ms=0)
    [dead_entry] = await pending_with(client, jobs.stream, "worker-dead", 1, idle_ms=10 * CLAIM_IDLE_MS)
    # XAUTOCLAIM looks at no more than 10 x COUNT entries per call; with one free slot that is 10.
    max_calls = LIVE_JOBS // 10 + 2
    calls = 0
    while calls < max_calls:
        calls += 1
        if [d.entry_id for d in await jobs.reclaim(count=1, min_idle_ms=CLAIM_IDLE_MS)] == [dead_entry]:
            break
    else:
        pytest.fail(f"the dead worker's job was not reclaimed in {max_calls} calls")
    print(f"reclaimed after {calls} calls")
    [pending] = await client.xpending_range(jobs.stream, keys.WORKER_GROUP, dead_entry, dead_entry, 1)
    assert pending["consumer"] == b"worker-new"


async def test_consumers_of_workers_gone_for_good_are_removed(client: Redis) -> None:
    model = f"reclaim-{uuid.uuid4().hex[:8]}"
    jobs = JobStream(client, model, "worker-new")
    await jobs.ensure_group()
    await client.xgroup_createconsumer(jobs.stream, keys.WORKER_GROUP, "worker-gone")
    await pending_with(client, jobs.stream, "worker-busy", 1, idle_ms=0)
    await asyncio.sleep(0.3)  # consumers' idle times cannot be set: let them age
    await client.xgroup_createconsumer(jobs.stream, keys.WORKER_GROUP, "worker-recent")
    assert await jobs.forget_dead_consumers(claim_idle_ms=200 // DEAD_CONSUMER_CLAIM_TIMEOUTS) == [
        "worker-gone"
    ]
    # Kept: one that owns a job however long it has been quiet, and one seen lately.
    assert await consumer_names(client, jobs.stream) == {"worker-busy", "worker-recent"}


async def test_only_consumers_quiet_for_many_claim_timeouts_are_forgotten(client: Redis) -> None:
    model = f"reclaim-{uuid.uuid4().hex[:8]}"
    jobs = JobStream(client, model, "worker-new")
    await jobs.ensure_group()
    await client.xgroup_createconsumer(jobs.stream, keys.WORKER_GROUP, "worker-gone")
    await asyncio.sleep(0.3)
    assert await jobs.forget_dead_consumers(claim_idle_ms=100) == []  # quiet for 3 claim timeouts: not yet
    assert "worker-gone" in await consumer_names(client, jobs.stream)
    await jobs.forget_dead_consumers(claim_idle_ms=300 // DEAD_CONSUMER_CLAIM_TIMEOUTS)
    assert "worker-gone" not in await consumer_names(client, jobs.stream)


async def consumer_names(client: Redis, stream: str) -> set[str]:
    return {c["name"].decode() for c in await client.xinfo_consumers(stream, keys.WORKER_GROUP)}
