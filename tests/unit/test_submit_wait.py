"""GATEWAY_SUBMIT_REPLICAS (gateway/queue.py): the submit waits until replicas have the job.

A real primary and replica (redis-server --replicaof). With the replica in sync a submit is
replicated before the caller hears "queued"; with it gone, the submit is not held past
GATEWAY_SUBMIT_WAIT_MS, the job is queued all the same, and the shortfall is counted.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from common import keys
from common.redis_client import connect
from devstack.redis_server import RedisServer
from gateway import metrics
from gateway.queue import JobQueue
from tests.unit.queue_helpers import deadline, queued_request_ids, valid_request
from tests.unit.test_placement_queue import pool_of

WAIT_MS = 300


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "primary")
    server.data_dir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def replica(tmp_path: Path, primary: RedisServer) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "replica", args=("--replicaof", "127.0.0.1", str(primary.port)))
    server.data_dir.mkdir()
    server.start()

    with redis.Redis(port=server.port) as sync:
        end = time.monotonic() + 10
        while sync.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < end, "the replica did not sync"
            time.sleep(0.05)
    yield server
    server.stop()


@pytest.fixture
async def queue(primary: RedisServer, replica: RedisServer) -> AsyncIterator[JobQueue]:
    client: Redis = connect(primary.url, socket_timeout=5)
    queue = JobQueue(client, client, "submit-wait-test", 100, submit_replicas=1, submit_wait_ms=WAIT_MS)
    await queue.start()
    yield queue
    await queue.stop()
    await client.aclose()


def unreplicated() -> float:
    return metrics.UNREPLICATED_SUBMITS._value.get()


async def test_a_submit_returns_once_the_replica_has_the_job(queue: JobQueue, replica: RedisServer) -> None:
    before = unreplicated()
    request = valid_request()
    subscription = await queue.submit(request, deadline())
    # Read from the replica right after: the job is there, not on its way.

    with redis.Redis(port=replica.port) as on_replica:
        assert subscription.request_id in queued_request_ids(on_replica, request.model)
        assert on_replica.exists(keys.completion_log(subscription.request_id))
    assert unreplicated() == before


async def test_without_its_replica_a_submit_waits_no_longer_than_the_bound(
    queue: JobQueue, replica: RedisServer, primary: RedisServer
) -> None:
    replica.stop()
    before = unreplicated()
    request = valid_request()
    started = time.monotonic()
    subscription = await queue.submit(request, deadline())
    waited = time.monotonic() - started
    print(f"submit with no replica: {waited * 1000:.0f} ms (bound {WAIT_MS} ms)")

    with redis.Redis(port=primary.port) as on_primary:
        assert subscription.request_id in queued_request_ids(on_primary, request.model)
    assert unreplicated() == before + 1
    assert waited < WAIT_MS / 1000 + 5  # bounded by the wait, not by a socket timeout


async def test_a_primary_that_lost_its_scripts_still_queues_the_job(
    queue: JobQueue, primary: RedisServer
) -> None:
    # A replica just promoted has an empty script cache: the pipelined EVALSHA gets NOSCRIPT.
    with redis.Redis(port=primary.port) as on_primary:
        on_primary.script_flush()
        request = valid_request()
        subscription = await queue.submit(request, deadline())
        assert queued_request_ids(on_primary, request.model) == [subscription.request_id]


async def test_a_job_moved_off_its_workers_stream_waits_for_the_replica_too(
    primary: RedisServer, replica: RedisServer
) -> None:
    # A placed job its worker did not take moves to the shared stream (gateway/placement.py): the
    # move is a write of the job like its submit, so it waits for the replica too.
    client: Redis = connect(primary.url, socket_timeout=5)
    pool = await pool_of(client, delay=0.05, submit_replicas=1, submit_wait_ms=WAIT_MS)
    try:
        first = await pool.submit()
        await pool.w1.read_new(8, block_ms=None)  # taken: never moved
        await pool.ran_on(first, pool.w1)
        replica.stop()
        before = unreplicated()
        placed = await pool.submit()
        assert placed.job_stream == pool.w1.own.stream
        assert unreplicated() == before + 1  # its submit's WAIT found no replica
        end = time.monotonic() + 5
        while placed.job_stream != keys.job_stream(pool.model):
            assert time.monotonic() < end, "the placed job was never moved"
            await asyncio.sleep(0.02)
        assert unreplicated() == before + 2  # and so did its move's
    finally:
        await pool.queue.stop()
        await client.aclose()
