"""A gateway whose reply stream is gone (gateway/queue.py), against a real redis-server.

The stream expires when the gateway stops refreshing it for its TTL (a frozen process);
workers then abort its jobs and drop their events. Deleting the key stands in for that here;
tests/faults/test_gateway_faults.py freezes a real gateway.
"""

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from common import keys
from common.redis_client import connect
from devstack.redis_server import RedisServer
from gateway.errors import Unavailable
from gateway.queue import JobQueue
from tests.unit.queue_helpers import deadline, valid_request

GATEWAY_ID = "reply-stream-test"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = connect(redis_server.url, socket_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture
async def queue(client: Redis) -> AsyncIterator[JobQueue]:
    queue = JobQueue(client, client, GATEWAY_ID, max_queued_jobs=100)
    await queue.start()
    yield queue
    await queue.stop()


async def test_a_new_call_renews_a_lost_reply_stream_and_ends_the_calls_in_flight(
    queue: JobQueue, client: Redis
) -> None:
    in_flight = await queue.submit(valid_request(), deadline())
    await client.delete(keys.reply_stream(GATEWAY_ID))
    new = await queue.submit(valid_request(), deadline())
    assert await client.exists(keys.reply_stream(GATEWAY_ID))
    with pytest.raises(Unavailable, match="reply stream"):
        await asyncio.wait_for(in_flight.next(), 1)
    assert queue.num_subscriptions == 1 and new.entry_id
    assert queue.can_relay


async def test_the_keepalive_notices_a_lost_reply_stream(queue: JobQueue, client: Redis) -> None:
    in_flight = await queue.submit(valid_request(), deadline())
    await client.delete(keys.reply_stream(GATEWAY_ID))
    await queue.refresh_reply_stream()
    with pytest.raises(Unavailable, match="expired"):
        await asyncio.wait_for(in_flight.next(), 1)
    assert await client.exists(keys.reply_stream(GATEWAY_ID))
    assert queue.num_subscriptions == 0 and queue.can_relay
