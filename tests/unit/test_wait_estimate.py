"""What a refusal for a full queue tells the caller (gateway/wait_estimate.py, gateway/errors.py)."""

import uuid
from collections.abc import AsyncIterator

import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from redis.asyncio import Redis

from gateway.errors import QueueFull
from gateway.queue import JobQueue
from gateway.wait_estimate import WaitEstimator
from tests.unit.queue_helpers import deadline, valid_request


def test_the_wait_is_the_jobs_ahead_over_capacity_times_the_mean_job_time() -> None:
    waits = WaitEstimator()
    assert waits.wait_seconds("m", 5) is None  # nothing known yet
    waits.job_finished("m", 2.0)
    assert waits.wait_seconds("m", 5) is None  # no live capacity known
    waits.set_capacity("m", 4)
    assert waits.wait_seconds("m", 8) == pytest.approx(8 * 2.0 / 4)
    waits.job_finished("m", 12.0)  # a moving average: the newest job weighs a tenth
    assert waits.wait_seconds("m", 4) == pytest.approx(4 * 3.0 / 4)
    waits.job_finished("m", float("nan"))  # ignored
    waits.set_capacity("m", 0)  # no live worker: no estimate
    assert waits.wait_seconds("m", 4) is None
    assert waits.wait_seconds("other", 1) is None


def test_a_refusal_carries_the_position_and_the_estimate_on_both_transports() -> None:
    error = QueueFull("m", 9, wait_seconds=12.34)
    assert "would be #10 in line, estimated wait 12s" in error.message
    assert dict(error.metadata) == {"x-queue-position": "10", "x-estimated-wait-seconds": "12.3"}
    retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
    details = error.to_status().details
    assert details[0].Unpack(retry) and details[1].Unpack(info)
    assert retry.retry_delay == duration_pb2.Duration(seconds=12, nanos=340_000_000)
    assert info.reason == "queue_full"
    assert dict(info.metadata) == {"queue_position": "10", "estimated_wait_seconds": "12.3"}
    # The delay is bounded: never below the configured one, never past a minute.
    assert QueueFull("m", 1, wait_seconds=0.01).retry_after_seconds == QueueFull.retry_after_seconds
    assert QueueFull("m", 1, wait_seconds=3600).retry_after_seconds == QueueFull.MAX_RETRY_AFTER_SECONDS


@pytest.fixture
async def queue(client: Redis) -> AsyncIterator[JobQueue]:
    queue = JobQueue(client, client, f"gw-{uuid.uuid4().hex[:6]}", 2)  # GATEWAY_MAX_QUEUED_JOBS 2
    await queue.start()
    yield queue
    await queue.stop()


async def test_a_full_queue_refuses_with_what_its_finished_jobs_predict(queue: JobQueue) -> None:
    request = valid_request()
    for _ in range(2):
        await queue.submit(request, deadline())
    queue.waits.set_capacity(request.model, 2)  # what the health tick reads off the registry
    for _ in range(3):
        queue.waits.job_finished(request.model, 4.0)  # what the relay reports of finished calls
    with pytest.raises(QueueFull) as refused:
        await queue.submit(request, deadline())
    assert refused.value.queue_position == 3 and refused.value.wait_seconds == pytest.approx(6.0)
    assert refused.value.retry_after_seconds == pytest.approx(6.0)


def test_a_configured_delay_over_a_minute_is_kept() -> None:
    slow = type("SlowQueueFull", (QueueFull,), {"retry_after_seconds": 90.0})
    assert slow("m", 1, wait_seconds=5.0).retry_after_seconds == 90.0
    assert slow("m", 1, wait_seconds=500.0).retry_after_seconds == 90.0
