"""The gateway dies, drains, or is flooded; jobs of a dead gateway stop burning engine time."""

import signal
import time

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chat.v1 import chat_pb2_grpc
from tests.faults.conftest import bench_text, check_clean
from tests.faults.helpers import TimedStream, started
from tests.integration.stack import Stack, chat_request, running_requests


def test_jobs_of_a_killed_gateway_are_aborted_on_the_worker(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=1)
    stream = TimedStream(stub, chat_request(max_tokens=2000))  # 100 s at 20 tokens/s
    stream.read(content_chunks=3)
    assert fault_stack.gateway is not None
    fault_stack.gateway.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    port = fault_stack.worker_metrics_ports[0]
    while running_requests(port) and time.monotonic() - killed_at < 30:
        time.sleep(0.1)
    freed = time.monotonic() - killed_at
    print(f"gateway SIGKILL -> worker aborted its job after {freed:.1f}s")
    assert running_requests(port) == 0
    assert freed < 10 + 2 + 1  # reply stream TTL + keepalive period + polling
    check_clean(fault_stack, fault_redis_client)


def test_gateway_sigterm_lets_open_streams_finish(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=1)
    stream = TimedStream(stub, chat_request(max_tokens=40))  # 2 s
    stream.read(content_chunks=3)
    assert fault_stack.gateway is not None
    fault_stack.gateway.send_signal(signal.SIGTERM)
    stream.read()
    assert stream.text == bench_text(40)
    assert fault_stack.gateway.wait(timeout=15) == 0
    check_clean(fault_stack, fault_redis_client)


def test_a_flood_past_the_queue_limit_is_refused_at_once_with_a_retry_delay(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    fault_stack.gateway_env["GATEWAY_MAX_QUEUED_JOBS"] = "3"
    fault_stack.start_gateway()  # no worker: jobs stay queued
    channel = grpc.insecure_channel(fault_stack.address)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    queued = [stub.StreamChatCompletion(chat_request(max_tokens=4), timeout=60) for _ in range(3)]
    deadline = time.monotonic() + 10
    while fault_redis_client.xlen("chat:jobs:SmolLM2-135M-Instruct") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = 0
    for _ in range(20):
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ChatCompletion(chat_request(max_tokens=4), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - start < 1
        retry = error_details_pb2.RetryInfo()
        status = rpc_status.from_call(caught.value)
        assert status is not None and status.details[0].Unpack(retry)
        assert retry.retry_delay.ToTimedelta().total_seconds() == 1
        refused += 1
    assert refused == 20
    for call in queued:
        call.cancel()
    fault_stack.start_worker()  # drops the cancelled jobs without running them
    check_clean(fault_stack, fault_redis_client)
