"""The gateway reads how many tokens a job generated from its progress record (gateway/queue.py
generated_tokens), as the worker writes it (worker/publisher.py), against a real redis-server.

It is what a call that ends before its job's Finished (caller gone, deadline, lost events) is
charged, so it must count exactly the tokens the events published."""

import uuid

from redis.asyncio import Redis

from common import keys
from gateway.queue import JobQueue
from worker.publisher import EventPublisher
from worker.runner import JobEvents


async def test_the_tokens_in_a_progress_record_are_the_tokens_published(client: Redis) -> None:
    gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
    queue = JobQueue(client, client, gateway_id, max_queued_jobs=10)
    await client.xadd(keys.reply_stream(gateway_id), {"init": "1"})
    publisher = EventPublisher(client)
    publisher.start()
    request_id = uuid.uuid4().hex
    try:
        assert await queue.generated_tokens(request_id) == 0  # no record: not started, or ended
        events = JobEvents(request_id, keys.reply_stream(gateway_id), 1, publisher)
        events.started("w1", "fp")
        events.delta("Hel", 2, (7, 8))
        events.delta("lo", 3, (9,))
        await publisher.flush()
        assert await queue.generated_tokens(request_id) == 3
    finally:
        await publisher.stop()
        await client.delete(keys.progress(request_id), keys.reply_stream(gateway_id))
