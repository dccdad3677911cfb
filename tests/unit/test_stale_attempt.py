"""A worker that stalled past the claim timeout ends nothing of the attempt that took its job over
(worker/jobs.py), against a real redis-server.

Sequence (issue 22, finding 1): worker A freezes; B reclaims the job (XAUTOCLAIM) and takes the
progress record over as attempt 2; A wakes, its engine having finished meanwhile, and ends its
run. Its Finished event is fenced off by the publish script; its acknowledgment (or dead letter)
must be too, or it deletes B's pending entry and progress record and B's caller hangs.
"""

import uuid

from redis.asyncio import Redis

from common import codec, keys
from devstack.redis_server import RedisServer
from worker.jobs import Delivery, JobStream
from worker.publisher import EventPublisher
from worker.runner import JobEvents


async def taken_over(client: Redis, publisher: EventPublisher) -> tuple[JobStream, Delivery, JobStream, str]:
    """A job that worker A ran and published for, then worker B reclaimed as attempt 2."""
    model = f"stale-{uuid.uuid4().hex[:8]}"
    request_id = f"r-{uuid.uuid4().hex[:8]}"
    reply_to = keys.reply_stream(f"gw-{uuid.uuid4().hex[:8]}")
    await client.xadd(reply_to, {"init": "1"})
    a, b = JobStream(client, model, "worker-a"), JobStream(client, model, "worker-b")
    await a.ensure_group()
    await client.xadd(a.stream, {keys.REQUEST_ID_FIELD: request_id.encode()})
    await client.set(keys.submitted(a.stream, request_id), b"1")
    [delivery_a] = await a.read_new(1, block_ms=None)
    events_a = JobEvents(request_id, reply_to, 1, publisher)
    events_a.started("worker-a", "fp")
    events_a.delta("one ", 1, (11,))
    await publisher.flush()
    # A freezes: its entry goes idle past the claim timeout and B takes it over.
    [delivery_b] = await b.reclaim(count=1, min_idle_ms=0)
    assert delivery_b.attempt == 2
    progress = await b.take_over_progress(request_id, 2)
    assert progress is not None
    events_b = JobEvents(request_id, reply_to, 2, publisher)
    events_b.continue_from(progress)
    events_b.delta("two ", 2, (12,))
    await publisher.flush()
    return a, delivery_a, b, request_id


async def owned_by_b(client: Redis, b: JobStream, request_id: str) -> None:
    pending = await client.xpending_range(b.stream, keys.WORKER_GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == [b"worker-b"]
    record = await client.get(keys.progress(request_id))
    assert record is not None and codec.decode_progress(record).attempt == 2
    assert codec.decode_progress(record).token_ids == (11, 12)
    assert await client.exists(keys.submitted(b.stream, request_id))


async def test_a_woken_worker_does_not_acknowledge_a_job_another_worker_took_over(
    client: Redis, publisher: EventPublisher
) -> None:
    a, delivery_a, b, request_id = await taken_over(client, publisher)
    assert not await a.acknowledge(delivery_a)  # A wakes and finishes: not its job any more
    await owned_by_b(client, b, request_id)


async def test_a_woken_worker_does_not_dead_letter_a_job_another_worker_took_over(
    client: Redis, publisher: EventPublisher
) -> None:
    a, delivery_a, b, request_id = await taken_over(client, publisher)
    assert not await a.dead_letter(delivery_a, "test: stale attempt gives up")
    await owned_by_b(client, b, request_id)
    assert await client.xlen(keys.dead_letter_stream(b.stream)) == 0


async def test_the_attempt_that_owns_the_job_acknowledges_it(
    client: Redis, publisher: EventPublisher
) -> None:
    a, delivery_a, b, request_id = await taken_over(client, publisher)
    [pending] = await client.xpending_range(b.stream, keys.WORKER_GROUP, "-", "+", 1)
    delivery_b = Delivery(pending["message_id"], request_id, "", 2, None)
    assert await b.acknowledge(delivery_b)
    assert await client.xlen(b.stream) == 0
    assert not await client.exists(keys.progress(request_id))
    assert not await client.exists(keys.submitted(b.stream, request_id))
    assert not await a.acknowledge(delivery_a)  # and A, waking after that, finds nothing to end


async def test_a_dead_letter_by_the_owner_moves_the_job(client: Redis) -> None:
    model = f"stale-{uuid.uuid4().hex[:8]}"
    jobs = JobStream(client, model, "worker-a")
    await jobs.ensure_group()
    await client.xadd(jobs.stream, {keys.REQUEST_ID_FIELD: b"r-dl", keys.PAYLOAD_FIELD: b"junk"})
    [delivery] = await jobs.read_new(1, block_ms=None)
    assert await jobs.dead_letter(delivery, "undecodable")
    [(_id, fields)] = await client.xrange(keys.dead_letter_stream(jobs.stream))
    assert fields[b"reason"] == b"undecodable" and fields[keys.PAYLOAD_FIELD] == b"junk"
    assert fields[b"attempt"] == b"1"
    assert await client.xlen(jobs.stream) == 0


async def test_an_entry_acknowledged_during_a_reclaim_is_skipped_not_fatal(redis_server: RedisServer) -> None:
    # XAUTOCLAIM hands us the entry; before we read its delivery count, its job ends elsewhere.
    # Before: `[pending] = await xpending_range(...)` raised ValueError, which killed the worker.
    model = f"stale-{uuid.uuid4().hex[:8]}"

    class AcknowledgedRightAfterTheClaim(Redis):  # a real client, with the race forced in between
        async def xautoclaim(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            reply = await super().xautoclaim(*args, **kwargs)
            for entry_id, _fields in reply[1]:
                await self.xack(keys.job_stream(model), keys.WORKER_GROUP, entry_id)
            return reply

    client = AcknowledgedRightAfterTheClaim.from_url(redis_server.url)
    try:
        dead, live = JobStream(client, model, "worker-dead"), JobStream(client, model, "worker-live")
        await dead.ensure_group()
        await client.xadd(dead.stream, {keys.REQUEST_ID_FIELD: b"r-race"})
        await dead.read_new(1, block_ms=None)
        assert await live.reclaim(count=1, min_idle_ms=0) == []
    finally:
        await client.aclose()
