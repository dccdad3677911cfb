"""A command that Redis ran but whose reply timed out is retried (common/redis_client.py):
the scripts that queue jobs and count rate limits must take effect once all the same.

A TCP proxy holds Redis's reply back past the client's socket timeout, so the real retry
policy of connect() runs the script a second time on a new connection.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio import Redis

from common import codec, keys
from common.redis_client import connect
from gateway.apikeys import KeyRecord
from gateway.errors import Unavailable
from gateway.queue import JobQueue
from gateway.ratelimit import RateLimiter
from tests.tcp_proxy import TcpProxy
from tests.unit.queue_helpers import deadline, queued_request_ids, valid_request
from worker.publisher import EventPublisher
from worker.runner import JobEvents

SOCKET_TIMEOUT = 0.3
LATE = 0.8  # the held reply arrives after the client has given up and retried


@pytest.fixture
async def via_proxy(proxy: TcpProxy) -> AsyncIterator[Redis]:
    client = connect(proxy.url, socket_timeout=SOCKET_TIMEOUT)
    yield client
    await client.aclose()


async def started_queue(client: Redis) -> JobQueue:
    queue = JobQueue(client, client, "retry-test", max_queued_jobs=100)
    await queue.waiting_jobs("warm-up")  # loads the scripts, so the held reply is the submit's own
    queue.release(await queue.submit(valid_request(), deadline()))
    return queue


async def test_a_retried_submit_queues_the_job_once(
    proxy: TcpProxy, via_proxy: Redis, direct: redis.Redis
) -> None:
    queue = await started_queue(via_proxy)
    for held_step in (0, 1):  # the submit's two steps: open the call, queue the job
        request = valid_request()
        proxy.hold_replies(LATE, after=held_step)
        subscription = await queue.submit(request, deadline())
        assert proxy.reply_held.is_set()  # the step's reply was held: it ran twice
        assert queued_request_ids(direct, request.model) == [subscription.request_id]
        [(entry_id, _fields)] = direct.xrange(keys.job_stream(request.model))
        assert subscription.entry_id == entry_id
        [(_id, call)] = direct.xrange(keys.completion_log(subscription.request_id))  # one call record
        assert list(call) == [b"call"]
        queue.release(subscription)
    await queue.stop()


async def test_a_submit_that_never_got_its_reply_cancels_the_job_it_queued(
    proxy: TcpProxy, via_proxy: Redis, direct: redis.Redis
) -> None:
    queue = await started_queue(via_proxy)
    request = valid_request()
    # The job step's reply and its retry's time out: the caller is told UNAVAILABLE.
    proxy.hold_replies(LATE, count=2, after=1)
    with pytest.raises(Unavailable):
        await queue.submit(request, deadline())
    await queue.stop()  # waits for the background cancel
    [request_id] = queued_request_ids(direct, request.model)
    assert direct.exists(
        keys.cancel_flag(keys.job_stream(request.model), request_id)
    )  # no worker runs it for nobody
    assert queue.num_subscriptions == 0


def record(rpm: int = 0, tpm: int = 0) -> KeyRecord:
    return KeyRecord(
        name="k",
        models=("*",),
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
        revoked=False,
        digest=uuid.uuid4().hex,
    )


async def test_a_retried_admit_charges_once_and_a_retried_refund_refunds_once(
    proxy: TcpProxy, via_proxy: Redis, direct: redis.Redis
) -> None:
    if (left := 60 - time.time() % 60) < 5:
        await asyncio.sleep(left)  # a refund counts only in the window of its admit
    limiter = RateLimiter(via_proxy)
    await limiter.admit(record(tpm=1000), 1)  # loads the admit script
    key = record(rpm=10, tpm=1000)
    proxy.hold_replies(LATE)
    budget = await limiter.admit(key, 100)
    assert proxy.reply_held.is_set()
    window = keys.rate_window(key.digest, budget.window)
    assert direct.hgetall(window) == {b"requests": b"1", b"tokens": b"100"}
    assert (budget.used_requests, budget.used_tokens) == (1, 100)

    await limiter.refund(budget, 1)  # loads the refund script
    proxy.hold_replies(LATE)
    await limiter.refund(budget, 40)
    assert proxy.reply_held.is_set()
    assert direct.hget(window, "tokens") == b"59"


async def test_a_retried_event_batch_is_written_once(
    proxy: TcpProxy, via_proxy: Redis, direct: redis.Redis
) -> None:
    publisher = EventPublisher(via_proxy)
    publisher.start()
    reply_to = keys.reply_stream(f"gw-{uuid.uuid4().hex[:8]}")
    direct.xadd(reply_to, {"init": "1"})  # workers write with NOMKSTREAM: the gateway makes it
    events = JobEvents("r-retry", reply_to, 1, publisher)
    events.started("w1", "fp")
    await publisher.flush()  # loads the script, so the held reply is the delta's own
    proxy.hold_replies(LATE)
    events.delta("Hel", 2, (7, 8))
    await publisher.flush()
    assert proxy.reply_held.is_set()  # the script ran twice
    record = codec.decode_progress(direct.get(keys.progress("r-retry")))
    assert record == codec.Progress(1, 1, 3, (7, 8))  # the tokens are in the record once
    assert len(direct.xrange(reply_to)) == 3  # init, started, the delta once
    await publisher.stop()
