"""Steps split because their keys live in two Redis Cluster slots (common/keys.py): a crash
between the steps loses nothing and repeats nothing. Against a real redis-server; the crash is
the second step never running (or failing), as when the process dies between them."""

import time
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError

from common import codec, keys
from gateway.completion_log import CallRecord
from gateway.queue import JobQueue
from tests.unit.queue_helpers import deadline, valid_request
from worker.jobs import JobStream
from worker.publisher import EventPublisher
from worker.runner import JobEvents


async def test_a_call_opened_whose_job_was_never_queued_leaves_only_a_log_that_expires(client: Redis) -> None:
    gateway_id = f"gw-{uuid.uuid4().hex[:6]}"
    queue = JobQueue(client, client, gateway_id, max_queued_jobs=10)
    await queue.start()
    request = valid_request()
    request_id = keys.new_request_id(gateway_id)
    log_key = keys.completion_log(request_id)
    record = CallRecord(request_id, "anonymous", request.model, int(time.time()), deadline())
    opened = await queue._open_call(
        keys=[keys.reply_stream(gateway_id), log_key], args=[record.to_json(), 60_000]
    )
    assert opened == 1
    # The gateway dies here: its caller never got the id, nothing was queued, the log expires.
    assert await client.xlen(keys.job_stream(request.model)) == 0
    assert 0 < await client.pttl(log_key) <= 60_000
    # Run again (a retry of the step), it adds no second call record.
    assert (
        await queue._open_call(keys=[keys.reply_stream(gateway_id), log_key], args=[record.to_json(), 60_000])
        == 1
    )
    assert [list(fields) for _id, fields in await client.xrange(log_key)] == [[b"call"]]
    await queue.stop()


async def test_a_submit_whose_gateway_stream_is_gone_queues_nothing(client: Redis) -> None:
    queue = JobQueue(client, client, f"gw-{uuid.uuid4().hex[:6]}", max_queued_jobs=10)
    await queue.start()
    request = valid_request()
    await client.delete(keys.reply_stream(queue._gateway_id))
    subscription = await queue.submit(request, deadline())  # renews the stream and submits again
    assert await client.xlen(keys.job_stream(request.model)) == 1
    assert await client.exists(keys.completion_log(subscription.request_id))
    queue.release(subscription)
    await queue.stop()


async def test_a_job_ended_whose_record_was_not_dropped_runs_no_more_and_its_record_expires(
    client: Redis, publisher: EventPublisher
) -> None:
    model = f"split-{uuid.uuid4().hex[:8]}"
    gateway_id = f"gw-{uuid.uuid4().hex[:6]}"
    request_id = keys.new_request_id(gateway_id)
    reply_to = keys.reply_stream(gateway_id)
    await client.xadd(reply_to, {"init": "1"})
    await client.xadd(keys.completion_log(request_id), {"call": "{}"})
    jobs = JobStream(client, model, "worker-a")
    await jobs.ensure_group()
    await client.xadd(jobs.stream, {keys.REQUEST_ID_FIELD: request_id.encode()})
    [delivery] = await jobs.read_new(1, block_ms=None)
    events = JobEvents(request_id, reply_to, 1, publisher, deadline=time.time() + 30)
    events.started("worker-a", "fp")
    events.delta("one ", 1, (11,))
    await publisher.flush()
    assert await client.exists(keys.progress(request_id))

    async def crash(*_args: object, **_kwargs: object) -> None:
        raise ConnectionError("the worker died between ending the entry and dropping the record")

    jobs._drop_progress = crash  # type: ignore[assignment,method-assign]
    with pytest.raises(ConnectionError):
        await jobs.acknowledge(delivery)
    # The entry is acknowledged and gone: no worker reclaims the job, so it never runs twice.
    assert await client.xlen(jobs.stream) == 0
    assert (await client.xpending(jobs.stream, keys.WORKER_GROUP))["pending"] == 0
    assert await JobStream(client, model, "worker-b").reclaim(count=10, min_idle_ms=0) == []
    # The record alone is left, and expires a minute after the job's deadline.
    record = await client.get(keys.progress(request_id))
    assert record is not None and codec.decode_progress(record).token_ids == (11,)
    assert 0 < await client.pttl(keys.progress(request_id)) <= 95_000
