"""A gateway whose reply stream is gone (gateway/queue.py), against a real redis-server.

The stream expires when the gateway stops refreshing it for its TTL (a frozen process);
workers then abort its jobs and drop their events. Deleting the key stands in for that here;
tests/faults/test_gateway_faults.py freezes a real gateway.
"""

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from common import codec, keys
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


def _started(request_id: str) -> dict[bytes, bytes]:
    """A worker's first event for the job, as it appends it to the reply stream."""
    event = codec.Event(request_id=request_id, seq=0, attempt=1, started=codec.Started())
    return {keys.REQUEST_ID_FIELD: request_id.encode(), keys.PAYLOAD_FIELD: codec.encode(event)}


async def test_a_loss_noticed_twice_renews_the_reply_stream_once(redis_server: RedisServer) -> None:
    # The reader logs in as a user of its own, turned off for a while: it cannot read, as across a
    # Redis restart, and meanwhile a new call finds the stream gone and renews it. When the reader
    # is back, its last entry belongs to the stream before that renewal: nothing more was lost since,
    # so the calls admitted after the renewal go on.
    client = connect(redis_server.url, socket_timeout=5)
    await client.acl_setuser("reader", enabled=True, passwords=["+pw"], commands=["+@all"], keys=["*"])
    reader = connect(f"redis://reader:pw@127.0.0.1:{redis_server.port}/0", socket_timeout=5)
    queue = JobQueue(client, reader, "twice-lost", max_queued_jobs=100)
    await queue.start()
    try:
        await asyncio.sleep(0.3)  # the reader has read the stream's first entry
        in_flight = await queue.submit(valid_request(), deadline())
        await client.acl_setuser("reader", enabled=False)
        await client.client_kill_filter(user="reader")
        await asyncio.sleep(0.3)  # the reader has failed to read
        await client.delete(keys.reply_stream("twice-lost"))
        admitted = await queue.submit(valid_request(), deadline())  # renews the stream
        with pytest.raises(Unavailable):
            await asyncio.wait_for(in_flight.next(), 1)
        await client.acl_setuser("reader", enabled=True)
        await asyncio.sleep(1)  # the reader reconnected and recovered
        await client.xadd(keys.reply_stream("twice-lost"), _started(admitted.request_id))
        event = await asyncio.wait_for(admitted.next(), 2)
        assert event.HasField("started")
    finally:
        await client.acl_setuser("reader", enabled=True)
        await asyncio.sleep(0.5)  # the reader is done trimming: redis-py can swallow a cancel there
        await queue.stop()
        await reader.aclose()
        await client.acl_deluser("reader")
        await client.aclose()


async def test_a_renewal_by_a_new_call_counts_as_healthy_at_once(redis_server: RedisServer) -> None:
    # The keepalive fails while Redis refuses this gateway (its user turned off, standing in for an
    # outage); then a new call renews the stream that expired meanwhile. The gateway can relay again
    # from that moment, not from the keepalive's next success.
    admin = connect(redis_server.url, socket_timeout=5)
    await admin.acl_setuser("gateway", enabled=True, passwords=["+pw"], commands=["+@all"], keys=["*"])
    main = connect(f"redis://gateway:pw@127.0.0.1:{redis_server.port}/0", socket_timeout=5)
    queue = JobQueue(main, admin, "renewed", max_queued_jobs=100)
    await queue.start()
    try:
        await admin.acl_setuser("gateway", enabled=False)
        await admin.client_kill_filter(user="gateway")
        await queue.refresh_reply_stream()
        assert not queue.can_relay
        await admin.acl_setuser("gateway", enabled=True)
        await admin.delete(keys.reply_stream("renewed"))
        await queue.submit(valid_request(), deadline())
        assert queue.can_relay
    finally:
        await admin.acl_setuser("gateway", enabled=True)
        await asyncio.sleep(0.5)  # see above: the reader is done trimming
        await queue.stop()
        await main.aclose()
        await admin.acl_deluser("gateway")
        await admin.aclose()
