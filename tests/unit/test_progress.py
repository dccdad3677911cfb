"""A job's progress record is written with its events, fenced per attempt, and taken over
(worker/publisher.py, worker/jobs.py), against a real redis-server."""

import time
import uuid

import pytest
from redis.asyncio import Redis

from common import codec, keys
from worker.jobs import JobStream
from worker.publisher import EventPublisher
from worker.runner import JobEvents

MODEL = "progress-test"


@pytest.fixture
async def reply_to(client: Redis) -> str:
    stream = keys.reply_stream(f"gw-{uuid.uuid4().hex[:8]}")
    await client.xadd(stream, {"init": "1"})  # workers write with NOMKSTREAM: the gateway makes it
    return stream


async def events_in(client: Redis, stream: str) -> list[codec.Event]:
    entries = await client.xrange(stream)
    return [codec.decode_event(f[keys.PAYLOAD_FIELD]) for _id, f in entries if keys.PAYLOAD_FIELD in f]


async def progress_of(client: Redis, request_id: str) -> codec.Progress | None:
    record = await client.get(keys.progress(request_id))
    return None if record is None else codec.decode_progress(record)


async def test_the_progress_record_says_what_the_events_published(
    client: Redis, publisher: EventPublisher, reply_to: str
) -> None:
    events = JobEvents("r-a", reply_to, 1, publisher)
    events.started("w1", "fp")
    events.delta("Hel", 2, (7, 8))
    events.delta("lo", 3, (9,))
    await publisher.flush()
    assert [e.seq for e in await events_in(client, reply_to)] == [0, 1, 2]
    assert await progress_of(client, "r-a") == codec.Progress(1, 2, len("Hello"), (7, 8, 9))


async def test_events_of_an_attempt_taken_over_are_dropped(
    client: Redis, publisher: EventPublisher, reply_to: str
) -> None:
    old = JobEvents("r-b", reply_to, 1, publisher)
    old.started("w1", "fp")
    old.delta("a", 1, (1,))
    await publisher.flush()
    taken = await JobStream(client, MODEL, "w2").take_over_progress("r-b", 2)
    assert taken == codec.Progress(1, 1, 1, (1,))
    old.delta("b", 2, (2,))  # the old worker woke up: neither its event nor its progress is written
    await publisher.flush()
    assert [e.seq for e in await events_in(client, reply_to)] == [0, 1]
    new = JobEvents("r-b", reply_to, 2, publisher)
    new.continue_from(taken)
    new.started("w2", "fp")
    new.delta("c", 2, (3,))
    await publisher.flush()
    published = await events_in(client, reply_to)
    assert [(e.attempt, e.seq) for e in published] == [(1, 0), (1, 1), (2, 2), (2, 3)]
    assert published[2].started.continued and published[2].started.continued_from_tokens == 1
    assert await progress_of(client, "r-b") == codec.Progress(2, 3, 2, (1, 3))


async def test_an_attempt_that_starts_over_replaces_the_record_and_fences_the_older_one(
    client: Redis, publisher: EventPublisher, reply_to: str
) -> None:
    old = JobEvents("r-c", reply_to, 1, publisher)
    old.started("w1", "fp")
    old.delta("a", 1, (1,))
    await publisher.flush()
    JobEvents("r-c", reply_to, 2, publisher).started("w2", "fp")  # e.g. a JSON mode job
    old.delta("b", 2, (2,))
    await publisher.flush()
    assert [(e.attempt, e.seq) for e in await events_in(client, reply_to)] == [(1, 0), (1, 1), (2, 0)]
    assert await progress_of(client, "r-c") == codec.Progress(2, 0, 0, ())


async def test_nothing_is_taken_over_when_nothing_was_published(client: Redis) -> None:
    assert await JobStream(client, MODEL, "w2").take_over_progress("r-none", 2) is None
    assert not await client.exists(keys.progress("r-none"))


async def test_acknowledging_a_job_deletes_its_progress(
    client: Redis, publisher: EventPublisher, reply_to: str
) -> None:
    jobs = JobStream(client, MODEL, "w1")
    await jobs.ensure_group()
    await client.xadd(jobs.stream, {keys.REQUEST_ID_FIELD: b"r-d"})
    [delivery] = await jobs.read_new(1, block_ms=None)
    events = JobEvents("r-d", reply_to, 1, publisher)
    events.started("w1", "fp")
    await publisher.flush()
    assert await client.exists(keys.progress("r-d"))
    assert await jobs.acknowledge(delivery)
    assert not await client.exists(keys.progress("r-d"))


def test_a_progress_record_round_trips_and_a_broken_one_is_refused() -> None:
    record = codec.encode_progress_header(3, 41, 1234) + codec.encode_token_ids([0, 1, 2**32 - 1])
    assert codec.decode_progress(record) == codec.Progress(3, 41, 1234, (0, 1, 2**32 - 1))
    with pytest.raises(codec.BadPayload):
        codec.decode_progress(record[:-1])
    with pytest.raises(codec.BadPayload):
        codec.decode_progress(b"not a record")


async def test_a_record_written_after_its_job_was_acknowledged_expires(
    client: Redis, publisher: EventPublisher, reply_to: str
) -> None:
    # A worker froze before its first event; another took the job over and finished it, and the
    # acknowledgment deleted the record. The first worker wakes up and writes its first event:
    # nothing will ever delete that record, so it must expire (a while after the job's deadline).
    jobs = JobStream(client, MODEL, "w2")
    await jobs.ensure_group()
    await client.xadd(jobs.stream, {keys.REQUEST_ID_FIELD: b"r-e"})
    [delivery] = await jobs.read_new(1, block_ms=None)
    assert await jobs.acknowledge(delivery)
    JobEvents("r-e", reply_to, 1, publisher, deadline=time.time() + 30).started("w1", "fp")
    await publisher.flush()
    assert 0 < await client.pttl(keys.progress("r-e")) <= 90_000


async def test_the_record_keeps_its_expiry_through_a_takeover(
    client: Redis, publisher: EventPublisher, reply_to: str
) -> None:
    old = JobEvents("r-f", reply_to, 1, publisher, deadline=time.time() + 30)
    old.started("w1", "fp")
    old.delta("a", 1, (1,))
    await publisher.flush()
    taken = await JobStream(client, MODEL, "w2").take_over_progress("r-f", 2)
    assert taken is not None
    new = JobEvents("r-f", reply_to, 2, publisher, deadline=time.time() + 30)
    new.continue_from(taken)
    new.delta("b", 2, (2,))
    await publisher.flush()
    assert await progress_of(client, "r-f") == codec.Progress(2, 2, 2, (1, 2))
    assert 0 < await client.pttl(keys.progress("r-f")) <= 90_000
