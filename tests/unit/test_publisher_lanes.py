"""The publisher writes one lane per gateway (worker/publisher.py): a gateway whose writes fail
holds back nobody else, and a job learns whether its own last event was written. Against a real
redis-server; a write fails for good when a job's progress record has the wrong type."""

import time
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common import codec, keys
from worker.publisher import EventPublisher
from worker.runner import JobEvents


async def gateway(client: Redis) -> str:
    reply_to = keys.reply_stream(f"gw-{uuid.uuid4().hex[:8]}")
    await client.xadd(reply_to, {"init": "1"})
    return reply_to


async def test_a_gateway_whose_writes_fail_holds_back_nobody_else(
    client: Redis, publisher: EventPublisher
) -> None:
    bad_gateway, good_gateway = await gateway(client), await gateway(client)
    broken = JobEvents(f"{keys.gateway_tag('x')}{uuid.uuid4().hex[4:]}", bad_gateway, 1, publisher)
    await client.lpush(keys.progress(broken._request_id), "not a record")  # every write of it fails
    fine = JobEvents(uuid.uuid4().hex, good_gateway, 1, publisher, deadline=time.time() + 30)
    broken.started("w", "fp")
    fine.started("w", "fp")
    fine.delta("hello", 1, (7,))
    fine.finished(codec.Finished(finish_reason="stop", prompt_tokens=3, completion_tokens=1))
    await fine.wait_written()  # its own gateway's lane: written, whatever the other one does
    assert await client.xlen(good_gateway) == 4  # the marker and three events
    with pytest.raises(RedisError):
        await broken.wait_written()  # told, not left waiting
    await publisher.flush()  # nothing pending: the failed batch is over, not waited for again


async def test_a_job_whose_last_batch_failed_is_told_even_after_a_later_batch_succeeded(
    client: Redis, publisher: EventPublisher
) -> None:
    shared_gateway = await gateway(client)
    broken = JobEvents(uuid.uuid4().hex, shared_gateway, 1, publisher)
    await client.lpush(keys.progress(broken._request_id), "not a record")
    broken.started("w", "fp")
    with pytest.raises(RedisError):
        await broken.wait_written()
    later = JobEvents(uuid.uuid4().hex, shared_gateway, 1, publisher, deadline=time.time() + 30)
    later.started("w", "fp")
    await later.wait_written()
    with pytest.raises(RedisError):
        await broken.wait_written()  # still failed: its own batch's outcome, not the lane's latest
