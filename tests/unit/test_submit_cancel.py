"""A caller that leaves while its submit awaits Redis (gateway/queue.py): nothing may leak.

Redis runs the submit script but its reply is held back (a TCP proxy) while the caller is
cancelled, as gRPC does when the caller disconnects or its deadline passes.
"""

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio import Redis

from common import keys
from common.redis_client import connect
from gateway.queue import JobQueue
from tests.tcp_proxy import TcpProxy
from tests.unit.queue_helpers import deadline, queued_request_ids, valid_request


@pytest.fixture
async def queue(proxy: TcpProxy) -> AsyncIterator[JobQueue]:
    client: Redis = connect(proxy.url, socket_timeout=5)
    queue = JobQueue(client, client, "cancel-test", max_queued_jobs=100)
    await queue.waiting_jobs("warm-up")
    queue.release(await queue.submit(valid_request(), deadline()))  # loads the submit script
    yield queue
    await client.aclose()


async def test_a_caller_cancelled_during_submit_leaves_no_subscription_and_a_cancelled_job(
    proxy: TcpProxy, queue: JobQueue, direct: redis.Redis
) -> None:
    request = valid_request()
    proxy.hold_replies(1.0)
    submit = asyncio.create_task(queue.submit(request, deadline()))
    assert await asyncio.to_thread(proxy.reply_held.wait, 5)  # Redis has queued the job
    submit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submit
    assert queue.num_subscriptions == 0
    await queue.stop()  # waits for the background cancel
    [request_id] = queued_request_ids(direct, request.model)
    assert direct.exists(
        keys.cancel_flag(keys.job_stream(request.model), request_id)
    )  # a worker drops it instead of running it


async def test_a_caller_whose_deadline_passes_during_submit_leaves_nothing_behind(
    proxy: TcpProxy, queue: JobQueue, direct: redis.Redis
) -> None:
    request = valid_request()
    proxy.hold_replies(1.0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await queue.submit(request, deadline())
    assert queue.num_subscriptions == 0
    await queue.stop()
    [request_id] = queued_request_ids(direct, request.model)
    assert direct.exists(keys.cancel_flag(keys.job_stream(request.model), request_id))
