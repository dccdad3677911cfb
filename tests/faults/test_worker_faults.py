"""A worker dies, freezes or is stopped mid-stream: the caller still gets a whole, exact reply."""

import re
import signal
import time

import grpc
import pytest
import redis

from chat.v1 import chat_pb2_grpc
from common import keys
from tests.faults.conftest import bench_text, check_clean
from tests.faults.helpers import TimedStream, owner_of_only_job, started
from tests.integration.stack import MODEL, Stack, chat_request, scrape


def test_sigkill_mid_stream_resumes_on_another_worker(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=2)
    stream = TimedStream(stub, chat_request(max_tokens=60))
    stream.read(content_chunks=10)
    owner = owner_of_only_job(fault_stack, fault_redis_client)
    [survivor] = [i for i, w in enumerate(fault_stack.workers) if w is not owner]
    generated_before = generated_tokens(fault_stack.worker_metrics_ports[survivor])
    owner.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    stream.read()
    done = time.monotonic() - killed_at
    continued_from = continued_tokens(fault_stack, survivor)
    generated = generated_tokens(fault_stack.worker_metrics_ports[survivor]) - generated_before
    print(
        f"SIGKILL -> stream continued after {continued_from} tokens on the other worker, which generated"
        f" {generated:.0f}; longest gap {stream.longest_gap:.2f}s; done after {done:.2f}s"
    )
    assert stream.text == bench_text(60)  # nothing missing, nothing twice
    assert stream.chunks[-1].choices[0].finish_reason == "length"
    assert stream.chunks[-1].usage.completion_tokens == 60
    # The other worker generated only the rest: nothing delivered was generated again.
    assert continued_from >= 10 and generated == 60 - continued_from
    # Default settings: claim timeout 2 s + the next look for orphans (0.5 s) + starting the
    # continuation (measured 2.05-2.16 s). The bound tells it from the old 10.4 s, with room for load.
    assert stream.longest_gap < 4.5
    outcomes = scrape(fault_stack.gateway_metrics_port)
    assert outcomes[f'chat_gateway_resumed_streams_total{{model="{MODEL}",outcome="continued"}}'] == 1
    check_clean(fault_stack, fault_redis_client)


def generated_tokens(metrics_port: int) -> float:
    return scrape(metrics_port)[f'chat_worker_generated_tokens_total{{model="{MODEL}"}}']


def continued_tokens(stack: Stack, worker: int) -> int:
    """How many tokens the worker's takeover continued from, as its log says."""
    log = (stack.log_dir / f"worker-{worker}.log").read_text()
    [tokens] = re.findall(r"attempt 2 continues after (\d+) tokens", log)
    return int(tokens)


def test_sigstop_past_the_claim_timeout_hands_the_job_over(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=2)
    stream = TimedStream(stub, chat_request(max_tokens=80))
    stream.read(content_chunks=5)
    frozen = owner_of_only_job(fault_stack, fault_redis_client)
    frozen.send_signal(signal.SIGSTOP)
    try:
        stream.read(content_chunks=30)  # the other worker has taken over
    finally:
        frozen.send_signal(signal.SIGCONT)  # it wakes up, finds the job gone and drops its copy
    stream.read()
    print(f"SIGSTOP -> taken over; longest gap {stream.longest_gap:.2f}s")
    assert stream.text == bench_text(80)
    check_clean(fault_stack, fault_redis_client)


def test_a_job_that_keeps_killing_workers_is_dead_lettered(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=2, WORKER_MAX_DELIVERIES="1")
    stream = TimedStream(stub, chat_request(max_tokens=200))
    stream.read(content_chunks=3)
    owner_of_only_job(fault_stack, fault_redis_client).send_signal(signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as caught:
        stream.read()
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "abandoned" in caught.value.details()
    # The caller hears of it as soon as the failure is published; the dead letter is written just
    # after, by the step that ends the job.
    dead = keys.dead_letter_stream(keys.job_stream(MODEL))
    end = time.monotonic() + 5
    while not fault_redis_client.xlen(dead) and time.monotonic() < end:
        time.sleep(0.05)
    [(_id, fields)] = fault_redis_client.xrange(dead)
    assert b"keep dying" in fields[b"reason"]
    fault_redis_client.delete(keys.dead_letter_stream(keys.job_stream(MODEL)))
    check_clean(fault_stack, fault_redis_client)


def test_sigterm_lets_the_running_job_finish_and_exits_zero(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=1)
    stream = TimedStream(stub, chat_request(max_tokens=30))  # 1.5 s at 20 tokens/s
    stream.read(content_chunks=3)
    worker = fault_stack.workers[0]
    worker.send_signal(signal.SIGTERM)
    stream.read()
    assert stream.text == bench_text(30)
    assert worker.wait(timeout=15) == 0
    check_clean(fault_stack, fault_redis_client)


def test_sigterm_hands_back_a_job_that_outlasts_the_drain(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=1, WORKER_DRAIN_SECONDS="1")
    fault_stack.start_worker()
    stream = TimedStream(stub, chat_request(max_tokens=100))  # 5 s at 20 tokens/s
    stream.read(content_chunks=5)
    draining = owner_of_only_job(fault_stack, fault_redis_client)
    draining.send_signal(signal.SIGTERM)
    stream.read()
    print(f"SIGTERM + hand back; longest gap {stream.longest_gap:.2f}s")
    assert stream.text == bench_text(100)
    assert draining.wait(timeout=15) == 0
    assert stream.longest_gap < 1 + 2 * 0.5 + 1.5  # drain + next reclaim + slack
    check_clean(fault_stack, fault_redis_client)


def test_a_running_job_is_stopped_at_its_deadline(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=1)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.ChatCompletion(chat_request(max_tokens=1000), timeout=1.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # not finish_reason "length"
    assert time.monotonic() - start < 3
    check_clean(fault_stack, fault_redis_client)


def test_a_job_whose_deadline_passed_in_the_queue_is_never_started(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    fault_stack.start_gateway()
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(fault_stack.address))
    with pytest.raises(grpc.RpcError) as caught:
        stub.ChatCompletion(chat_request(max_tokens=1000), timeout=1)  # no worker yet
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # At one token per second this job would hold the worker for 1000 s if it ran.
    fault_stack.start_worker(WORKER_BENCH_TOKENS_PER_SECOND="1")
    check_clean(fault_stack, fault_redis_client)
    outcomes = scrape(fault_stack.worker_metrics_ports[0])
    assert outcomes[f'chat_worker_jobs_total{{model="{MODEL}",outcome="deadline_exceeded"}}'] == 1
