"""Thousands of requests with random cancels and a worker killed part-way: all accounted for."""

import asyncio
import collections
import random
import signal
import time

import grpc
import redis

from chat.v1 import chat_pb2_grpc
from tests.faults.conftest import bench_text, check_clean
from tests.integration.stack import Stack, chat_request

REQUESTS = 3000
CONCURRENCY = 64
TOKENS = 8


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


async def one(stub: chat_pb2_grpc.ChatServiceStub, rng: random.Random) -> str:
    """Runs one streaming request; returns its outcome."""
    call = stub.StreamChatCompletion(chat_request(max_tokens=TOKENS), timeout=60)
    cancel_after = rng.randint(1, TOKENS) if rng.random() < 0.1 else None
    text, chunks = "", 0
    try:
        async for chunk in call:
            text += chunk.choices[0].delta.content
            chunks += 1
            if cancel_after is not None and chunks > cancel_after:
                call.cancel()
                return "cancelled by us"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    except asyncio.CancelledError:
        return "cancelled by us"
    return "OK" if text == bench_text(TOKENS) else f"wrong text {text!r}"


async def test_soak_with_random_cancels_and_a_killed_worker(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    fault_stack.worker_env["WORKER_BENCH_TOKENS_PER_SECOND"] = "200"
    fault_stack.worker_env["WORKER_MAX_CONCURRENCY"] = "64"
    fault_stack.start_gateway()
    fault_stack.start_worker()
    victim = fault_stack.start_worker()
    fault_stack.wait_worker_ready()
    assert fault_stack.gateway is not None
    gateway_pid = fault_stack.gateway.pid
    rng = random.Random(1)
    outcomes: collections.Counter[str] = collections.Counter()
    memory: list[float] = []
    start = time.monotonic()
    async with grpc.aio.insecure_channel(fault_stack.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        slots = asyncio.Semaphore(CONCURRENCY)

        async def run(i: int) -> None:
            async with slots:
                if i == REQUESTS // 3:
                    victim.send_signal(signal.SIGKILL)
                if i % 250 == 0:
                    memory.append(rss_mib(gateway_pid))
                outcomes[await one(stub, rng)] += 1

        await asyncio.gather(*(run(i) for i in range(REQUESTS)))
    elapsed = time.monotonic() - start
    print(f"soak: {REQUESTS} requests in {elapsed:.1f}s: {dict(outcomes)}; gateway RSS MiB {memory}")
    assert sum(outcomes.values()) == REQUESTS  # every request accounted for
    assert set(outcomes) <= {"OK", "cancelled by us"}, outcomes  # resumed, not failed or hung
    assert outcomes["OK"] > REQUESTS * 0.8
    assert max(memory[2:]) - memory[2] < 50, memory  # bounded after warm-up
    # The worker is killed at a random moment, possibly while it ends a job (a record to expire).
    check_clean(fault_stack, fault_redis_client, expiring_progress_ok=True)
