"""Calls whose job Redis lost end UNAVAILABLE; calls whose job ended normally are left alone.

A real redis-server; deleting a job's entry stands in for the loss (a crash of Redis that
takes the last second of writes with it, tests/faults/test_redis_faults.py -k crash).
"""

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

import gateway.queue
from common import codec, keys
from common.redis_client import connect
from devstack.redis_server import RedisServer
from gateway.errors import Unavailable
from gateway.queue import JobQueue
from gateway.subscription import Subscription
from tests.unit.queue_helpers import deadline, valid_request

GATEWAY_ID = "lost-jobs-test"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = connect(redis_server.url, socket_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture
async def queue(client: Redis, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[JobQueue]:
    # The test runs the check itself: the background one must not get there first.
    monkeypatch.setattr(gateway.queue, "LOST_JOB_CHECK_SECONDS", 3600.0)
    queue = JobQueue(client, client, GATEWAY_ID, max_queued_jobs=100)
    await queue.start()
    yield queue
    await asyncio.sleep(0.5)  # the reader is done trimming: redis-py can swallow a cancel there
    await queue.stop()


async def finish_like_a_worker(client: Redis, subscription: Subscription) -> None:
    """Publishes the job's events, then removes its entry, in a worker's order."""
    events = [
        codec.Event(request_id=subscription.request_id, seq=0, attempt=1, started=codec.Started()),
        codec.Event(request_id=subscription.request_id, seq=1, attempt=1, finished=codec.Finished()),
    ]
    for event in events:
        fields = {
            keys.REQUEST_ID_FIELD: subscription.request_id.encode(),
            keys.PAYLOAD_FIELD: codec.encode(event),
        }
        await client.xadd(keys.reply_stream(GATEWAY_ID), fields)  # type: ignore[arg-type]
    await client.xdel(keys.job_stream(subscription.model), subscription.entry_id)


async def test_a_lost_job_ends_its_call_and_a_finished_one_does_not(queue: JobQueue, client: Redis) -> None:
    lost = await queue.submit(valid_request(), deadline())
    finished = await queue.submit(valid_request(), deadline())
    queued = await queue.submit(valid_request(), deadline())
    await client.xdel(keys.job_stream(lost.model), lost.entry_id)
    await finish_like_a_worker(client, finished)  # its entry is gone too, after its last event
    assert await queue.fail_lost_jobs() == 1
    with pytest.raises(Unavailable, match="lost this job"):
        await asyncio.wait_for(lost.next(), 1)
    assert (await finished.next()).HasField("started")
    assert (await finished.next()).HasField("finished")
    assert not queued.done
    for subscription in (lost, finished, queued):
        queue.release(subscription)
