"""The primary fails over (SENTINEL FAILOVER, or SIGKILL) under load: nothing hangs.

Gateway and worker reach Redis through three sentinels (quorum 2, down-after 1 s). Streams are
in flight and short unary calls keep coming while the primary moves; every call must end
completed, exactly, or UNAVAILABLE (retryable), well before its deadline. Writes the old primary
took after the replica's promotion are lost with it: the gateway's lost-job and lost-event checks
turn those calls into UNAVAILABLE.
"""

import asyncio
import collections
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from chat.v1 import chat_pb2_grpc
from devstack.redis_sentinel import RedisSentinel
from tests.faults.conftest import BENCH_WORKER_ENV, GATEWAY_ENV, bench_text
from tests.faults.conftest import check_clean as check_clean_of_faults
from tests.integration.stack import Stack, chat_request, print_log_tails

STREAMS = 8
STREAM_TOKENS = 60  # at 20 tokens/s: 3 s each, so the failover lands mid-stream
UNARY_TOKENS = 4
DEADLINE_SECONDS = 60.0
# Every call ends within this long of the fault: failover (up to ~3 s after a SIGKILL), the
# gateway's look for lost jobs (2 s) or a worker's takeover (claim timeout 2 s), and the rest of
# a 3 s stream, with room for a loaded machine. A call that waited for its deadline takes 60 s.
ENDS_WITHIN_SECONDS = 20.0


@dataclass
class Outcome:
    kind: str  # "stream" or "unary"
    code: str  # OK, or the gRPC status name (or "wrong text")
    ended: float  # monotonic time the call ended
    details: str = ""


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[RedisSentinel]:
    topology = RedisSentinel(tmp_path / "redis")
    topology.start()
    yield topology
    topology.stop()


@pytest.fixture
def sentinel_stack(topology: RedisSentinel, tmp_path: Path) -> Iterator[Stack]:
    worker_env = {**BENCH_WORKER_ENV, "WORKER_MAX_CONCURRENCY": "32"}
    stack = Stack(topology, tmp_path, gateway_env=dict(GATEWAY_ENV), worker_env=worker_env)
    try:
        stack.start_worker()  # loads while the gateway starts
        stack.start_gateway()
        stack.wait_worker_ready(timeout=60)
        yield stack
    finally:
        stack.stop()
        print_log_tails(tmp_path)


async def one_stream(stub: chat_pb2_grpc.ChatServiceStub, in_flight: asyncio.Semaphore) -> Outcome:
    text, seen = "", 0
    try:
        call = stub.StreamChatCompletion(chat_request(max_tokens=STREAM_TOKENS), timeout=DEADLINE_SECONDS)
        async for chunk in call:
            text += chunk.choices[0].delta.content
            seen += 1
            if seen == 2:
                in_flight.release()
    except grpc.aio.AioRpcError as exc:
        return Outcome("stream", exc.code().name, time.monotonic(), exc.details() or "")
    finally:
        if seen < 2:
            in_flight.release()
    return Outcome("stream", "OK" if text == bench_text(STREAM_TOKENS) else "wrong text", time.monotonic())


async def one_unary(stub: chat_pb2_grpc.ChatServiceStub) -> Outcome:
    try:
        reply = await stub.ChatCompletion(chat_request(max_tokens=UNARY_TOKENS), timeout=DEADLINE_SECONDS)
    except grpc.aio.AioRpcError as exc:
        return Outcome("unary", exc.code().name, time.monotonic(), exc.details() or "")
    ok = reply.choices[0].message.content == bench_text(UNARY_TOKENS)
    return Outcome("unary", "OK" if ok else "wrong text", time.monotonic())


async def under_load(stack: Stack, fault: Callable[[], None], wait_moved: Callable[[], None]) -> None:
    """Streams in flight and unary calls every 0.1 s while `fault` moves the primary; wait_moved
    returns once clients can find the new one (the sentinels name it, the cluster promoted it)."""
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        in_flight = asyncio.Semaphore(0)
        streams = [asyncio.create_task(one_stream(stub, in_flight)) for _ in range(STREAMS)]
        for _ in range(STREAMS):
            await in_flight.acquire()

        def moved_at() -> float:
            wait_moved()
            return time.monotonic()

        faulted = time.monotonic()
        fault()
        unary: list[asyncio.Task[Outcome]] = []
        moved = asyncio.create_task(asyncio.to_thread(moved_at))
        while not moved.done() or not all(s.done() for s in streams):
            unary.append(asyncio.create_task(one_unary(stub)))
            await asyncio.sleep(0.1)
        failover_seconds = await moved - faulted
        outcomes = [*await asyncio.gather(*streams), *await asyncio.gather(*unary)]
        final = await one_unary(stub)
    counts = collections.Counter((o.kind, o.code) for o in outcomes)
    failed = [o.ended - faulted for o in outcomes if o.code != "OK"]
    window = f"between +{min(failed):.1f}s and +{max(failed):.1f}s" if failed else "none"
    slowest = max(o.ended for o in outcomes) - faulted
    print(
        f"the new primary was found {failover_seconds:.1f}s after the fault; failed calls ended "
        f"{window}; the last call ended {slowest:.1f}s after the fault, a new one completed at "
        f"+{final.ended - faulted:.1f}s; "
        + ", ".join(f"{kind} {code}: {n}" for (kind, code), n in sorted(counts.items()))
    )
    for outcome in outcomes:
        if outcome.code != "OK":
            print(f"  {outcome.kind} {outcome.code} at +{outcome.ended - faulted:.1f}s: {outcome.details}")
    assert {o.code for o in outcomes} <= {"OK", "UNAVAILABLE"}, counts
    assert slowest < ENDS_WITHIN_SECONDS
    assert final.code == "OK", final


def check_clean(stack: Stack, client: redis.Redis) -> None:
    """A job whose entry, or its delivery to the worker, was lost with the old primary still runs
    and publishes to the new one, which keeps its progress record; acknowledging the job then finds
    no pending entry of its own and leaves the record to expire."""
    check_clean_of_faults(stack, client, expiring_progress_ok=True)


def test_sentinel_failover_under_load(sentinel_stack: Stack, topology: RedisSentinel) -> None:
    old = topology.primary_port()
    asyncio.run(under_load(sentinel_stack, topology.failover, lambda: topology.wait_primary_moved(old)))
    with topology.node(topology.primary_port()) as primary:
        check_clean(sentinel_stack, primary)


def test_sigkill_of_the_primary_under_load(sentinel_stack: Stack, topology: RedisSentinel) -> None:
    old = topology.primary_port()
    asyncio.run(
        under_load(
            sentinel_stack, lambda: topology.primary().kill(), lambda: topology.wait_primary_moved(old)
        )
    )
    with topology.node(topology.primary_port()) as primary:
        check_clean(sentinel_stack, primary)
