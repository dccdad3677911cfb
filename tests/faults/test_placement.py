"""Cache-affine placement on real processes (gateway/placement.py): a conversation's turns run on
the worker that ran it before; a job placed on a worker that died runs elsewhere after the delay,
and a stream on a worker that died continues on another, as without placement.

(A worker that freezes while blocked in its read is delivered the next job on its streams by
Redis itself, placed there or not, as before placement: another takes it over after the claim
timeout, tests/faults/test_worker_faults.py.)"""

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import redis

from chat.v1 import chat_pb2_grpc
from common import keys
from tests.faults.conftest import bench_text, check_clean
from tests.faults.helpers import TimedStream, started
from tests.integration.stack import MODEL, Stack, chat_request, scrape


def placements(stack: Stack, outcome: str) -> float:
    return scrape(stack.gateway_metrics_port)[
        f'chat_gateway_placements_total{{model="{MODEL}",outcome="{outcome}"}}'
    ]


def finished_jobs(stack: Stack) -> list[float]:
    """Jobs each worker has finished so far (0 for one that is gone)."""
    counts = []
    for port, worker in zip(stack.worker_metrics_ports, stack.workers, strict=True):
        samples = scrape(port) if worker.poll() is None else {}
        counts.append(samples.get(f'chat_worker_jobs_total{{model="{MODEL}",outcome="finished"}}', 0.0))
    return counts


def placing(stack: Stack, client: redis.Redis) -> chat_pb2_grpc.ChatServiceStub:
    """Gateway and two workers, once the gateway sees both (it places only among two or more)."""
    stub = started(stack, workers=2)
    end = time.monotonic() + 10
    while (
        not all(b"stream" in v for v in client.hvals(keys.engines(MODEL)))
        or client.hlen(keys.engines(MODEL)) < 2
    ):
        assert time.monotonic() < end, "the workers never advertised their streams"
        time.sleep(0.1)
    time.sleep(1.5)  # the gateway's view of the workers refreshes every second
    return stub


def test_a_conversation_stays_on_its_worker_and_moves_when_that_worker_dies(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = placing(fault_stack, fault_redis_client)
    before = finished_jobs(fault_stack)
    for turn in range(4):
        request = chat_request(f"turn {turn}", max_tokens=4, prompt_cache_key="conv-1")
        assert stub.ChatCompletion(request, timeout=30).choices[0].message.content == bench_text(4)
    ran = [after - b for after, b in zip(finished_jobs(fault_stack), before, strict=True)]
    assert sorted(ran) == [0, 4], ran  # every turn on the worker that ran the first
    assert placements(fault_stack, "preferred") == 3

    # Killed, it still counts as live for a moment (its registry entry lasts the claim timeout):
    # the next turn is placed on it, waits the delay (50 ms) unread, and moves to the other.
    home = fault_stack.workers[ran.index(4)]
    home.send_signal(signal.SIGKILL)
    home.wait()
    start = time.monotonic()
    reply = stub.ChatCompletion(chat_request("turn 4", max_tokens=4, prompt_cache_key="conv-1"), timeout=30)
    took = time.monotonic() - start
    print(f"placed on a dead worker: moved, answered in {took:.2f}s")
    assert reply.choices[0].message.content == bench_text(4)
    assert placements(fault_stack, "moved") == 1
    assert took < 1.5  # the delay and 4 tokens at 20/s, not the claim timeout (2 s) and more
    check_clean(fault_stack, fault_redis_client)


def test_nothing_placed_on_a_worker_that_died_is_stranded(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = placing(fault_stack, fault_redis_client)
    before = finished_jobs(fault_stack)
    stub.ChatCompletion(chat_request("first", max_tokens=2, prompt_cache_key="conv-2"), timeout=30)
    [home] = [
        w for w, b, a in zip(fault_stack.workers, before, finished_jobs(fault_stack), strict=True) if a > b
    ]
    stream = TimedStream(stub, chat_request("second", max_tokens=40, prompt_cache_key="conv-2"))
    stream.read(content_chunks=5)
    assert placements(fault_stack, "preferred") == 1  # the stream runs where the first turn ran
    home.send_signal(signal.SIGKILL)
    home.wait()

    # The gateway still counts the dead worker live for a moment: turns placed on it meanwhile
    # are moved after the delay; the stream continues on the other worker after the claim timeout.
    def turn(k: int) -> str:
        reply = stub.ChatCompletion(
            chat_request(f"turn {k}", max_tokens=4, prompt_cache_key="conv-2"), timeout=30
        )
        return str(reply.choices[0].message.content)

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(turn, range(3)))
    stream.read()
    assert replies == [bench_text(4)] * 3
    assert stream.text == bench_text(40)  # nothing missing, nothing twice
    outcomes = scrape(fault_stack.gateway_metrics_port)
    assert outcomes[f'chat_gateway_resumed_streams_total{{model="{MODEL}",outcome="continued"}}'] == 1
    check_clean(fault_stack, fault_redis_client, expiring_progress_ok=True)
