"""Service tiers on their way through Redis (gateway/queue.py, worker/jobs.py), against a real
redis-server: a flex job waits in its own lane, which workers read only with the room on_demand
jobs leave; it carries the engine priority of its tier; a full flex lane refuses flex calls at
once (Groq's 498 capacity_exceeded) and never on_demand ones."""

import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
from google.rpc import code_pb2, error_details_pb2
from redis.asyncio import Redis

from common import keys
from gateway.completion_log import CallRecord
from gateway.errors import FlexCapacityExceeded
from gateway.queue import JobQueue
from gateway.subscription import Subscription
from gateway.validation import ValidRequest
from tests.unit.queue_helpers import deadline, valid_request
from tests.unit.test_placement_queue import pool_of
from worker.jobs import Delivery, ModelJobs


@pytest.fixture
async def queue(client: Redis) -> AsyncIterator[JobQueue]:
    queue = JobQueue(client, client, f"gw-{uuid.uuid4().hex[:6]}", 1000)
    await queue.start()
    yield queue
    await queue.stop()


@pytest.fixture
def on_demand() -> ValidRequest:
    return valid_request()


@pytest.fixture
async def worker(client: Redis, on_demand: ValidRequest) -> ModelJobs:
    jobs = ModelJobs(client, on_demand.model, "w1")
    await jobs.ensure_groups()
    return jobs


def flex(request: ValidRequest) -> ValidRequest:
    return dataclasses.replace(request, service_tier="flex")


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.request_id for d in deliveries]


async def submit(queue: JobQueue, request: ValidRequest) -> Subscription:
    return await queue.submit(request, deadline())


async def test_a_flex_job_waits_until_no_on_demand_job_does(
    queue: JobQueue, worker: ModelJobs, on_demand: ValidRequest
) -> None:
    first = await submit(queue, flex(on_demand))  # queued first, taken last
    assert first.job_stream == keys.flex_stream(on_demand.model)
    second = await submit(queue, on_demand)
    assert second.job_stream == keys.job_stream(on_demand.model)

    [taken] = await worker.read_new(1, block_ms=None)
    assert taken.request_id == second.request_id and taken.job is not None and taken.job.priority == 0
    [taken] = await worker.read_new(1, block_ms=None)
    assert taken.request_id == first.request_id and taken.stream == keys.flex_stream(on_demand.model)
    assert taken.job is not None and taken.job.priority == 1  # the engine schedules it after on_demand
    assert await worker.of(taken).acknowledge(taken)  # ends in its lane, as any job
    assert await queue._redis.xlen(keys.flex_stream(on_demand.model)) == 0


async def test_flex_jobs_take_only_the_room_on_demand_ones_leave(
    queue: JobQueue, worker: ModelJobs, on_demand: ValidRequest
) -> None:
    flex_calls = [await submit(queue, flex(on_demand)) for _ in range(2)]
    on_demand_calls = [await submit(queue, on_demand) for _ in range(2)]
    taken = await worker.read_new(3, block_ms=None)
    assert ids(taken) == [s.request_id for s in [*on_demand_calls, flex_calls[0]]]


async def test_a_read_takes_no_more_flex_jobs_than_it_is_told(
    queue: JobQueue, worker: ModelJobs, on_demand: ValidRequest
) -> None:
    flex_calls = [await submit(queue, flex(on_demand)) for _ in range(3)]
    taken = await worker.read_new(4, block_ms=None, flex_jobs=1)  # as worker/consumer.py limits it
    assert ids(taken) == [flex_calls[0].request_id]
    assert ids(await worker.read_new(4, block_ms=None, flex_jobs=0)) == []


async def test_a_full_flex_lane_refuses_flex_calls_at_once_and_on_demand_ones_never(
    queue: JobQueue, on_demand: ValidRequest
) -> None:
    queue.flex_max_queued_jobs = 2  # GATEWAY_FLEX_MAX_QUEUED_JOBS
    for _ in range(2):
        await submit(queue, flex(on_demand))
    with pytest.raises(FlexCapacityExceeded) as refused:
        await submit(queue, flex(on_demand))
    assert "flex capacity" in refused.value.message and "2 flex jobs waiting" in refused.value.message
    assert refused.value.status.http == 498 and refused.value.status.code == "capacity_exceeded"
    status = refused.value.to_status()
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(retry) and status.details[1].Unpack(info)
    assert info.reason == "capacity_exceeded" and info.metadata["queue_position"] == "3"
    assert "would be #3 in the flex lane" in refused.value.message
    assert await queue._redis.xlen(keys.flex_stream(on_demand.model)) == 2  # nothing left behind
    await submit(queue, on_demand)  # the on_demand lane has its own limit


async def test_a_dead_workers_flex_job_is_taken_over(
    client: Redis, queue: JobQueue, worker: ModelJobs, on_demand: ValidRequest
) -> None:
    dead = ModelJobs(client, on_demand.model, "w-dead")
    subscription = await submit(queue, flex(on_demand))
    [delivered] = await dead.read_new(1, block_ms=None)
    assert delivered.request_id == subscription.request_id
    [reclaimed] = await worker.reclaim(1, min_idle_ms=0)
    assert reclaimed.request_id == subscription.request_id and reclaimed.attempt == 2
    assert reclaimed.stream == keys.flex_stream(on_demand.model)


async def test_a_flex_job_is_never_placed_on_a_workers_own_stream(client: Redis) -> None:
    pool = await pool_of(client, delay=60.0)
    try:
        await pool.ran_on(await pool.submit(), pool.w1)  # w1 holds the prompt's prefix
        assert (await pool.submit()).job_stream == pool.w1.own.stream
        placed = await pool.queue.submit(flex(pool.request), deadline())
        assert placed.job_stream == keys.flex_stream(pool.model)  # its lane, behind on_demand work
    finally:
        await pool.queue.stop()


def test_a_call_record_keeps_its_tier_for_a_resume() -> None:
    record = CallRecord("id", "anonymous", "m", 1, 2.0, service_tier="flex")
    assert CallRecord.from_json(record.to_json()).service_tier == "flex"
    default = CallRecord("id", "anonymous", "m", 1, 2.0)
    assert b"service_tier" not in default.to_json()  # as older gateways wrote it
    assert CallRecord.from_json(default.to_json()).service_tier == "on_demand"
