"""Several requests at once, cancellation and deadlines, through the real stack."""

import asyncio
import time

import grpc
import pytest
import redis

from chat.v1 import chat_pb2_grpc
from common import keys
from tests.integration.stack import MODEL, Stack, chat_request, running_requests


def pending_jobs(client: redis.Redis) -> int:
    return int(client.xpending(keys.job_stream(MODEL), keys.WORKER_GROUP)["pending"])


async def wait_until_no_pending(client: redis.Redis, limit_seconds: float = 10.0) -> float:
    """Seconds until the worker has acknowledged every job (it acks only after the engine let go)."""
    start = time.monotonic()
    for _ in range(int(limit_seconds / 0.01)):
        if not pending_jobs(client):
            break
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_eight_concurrent_requests_all_complete(aio_stub: chat_pb2_grpc.ChatServiceStub) -> None:
    requests = [chat_request(f"Say a word about the number {i}.", max_tokens=16, seed=i) for i in range(8)]
    replies = await asyncio.gather(*(aio_stub.ChatCompletion(r) for r in requests))
    assert all(r.usage.completion_tokens > 0 and r.choices[0].message.content for r in replies)


async def test_a_long_generation_does_not_hold_up_a_short_one(
    aio_stub: chat_pb2_grpc.ChatServiceStub,
) -> None:
    long_call = aio_stub.StreamChatCompletion(
        chat_request("Write a long essay about rivers.", max_tokens=400)
    )
    await long_call.read()  # the long job is running
    short = await aio_stub.ChatCompletion(chat_request("Say hi.", max_tokens=4))
    assert short.usage.completion_tokens > 0
    assert long_call.done() is False  # still generating when the short one finished
    long_call.cancel()


async def test_cancelled_stream_aborts_its_job_promptly(
    aio_stub: chat_pb2_grpc.ChatServiceStub, redis_client: redis.Redis, stack: Stack
) -> None:
    call = aio_stub.StreamChatCompletion(chat_request("Write a long essay about mountains.", max_tokens=2000))
    for _ in range(3):
        await call.read()
    assert pending_jobs(redis_client) == 1
    call.cancel()
    cancelled_at = time.monotonic()
    port = stack.worker_metrics_ports[0]
    for _ in range(1000):
        if running_requests(port) == 0:
            break
        await asyncio.sleep(0.01)
    print(f"cancel -> engine request aborted: {(time.monotonic() - cancelled_at) * 1000:.0f} ms")
    assert running_requests(port) == 0
    await wait_until_no_pending(redis_client)
    assert pending_jobs(redis_client) == 0


async def test_caller_deadline_ends_the_call_and_the_job(
    aio_stub: chat_pb2_grpc.ChatServiceStub, redis_client: redis.Redis
) -> None:
    request = chat_request("Write a long essay about the ocean.", max_tokens=2000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await aio_stub.ChatCompletion(request, timeout=1.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until_no_pending(redis_client)
    assert pending_jobs(redis_client) == 0
