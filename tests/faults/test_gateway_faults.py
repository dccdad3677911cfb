"""The gateway dies, drains, or is flooded; jobs of a dead gateway stop burning engine time."""

import signal
import time
import urllib.error
import urllib.request

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from chat.v1 import chat_pb2_grpc
from common import keys
from tests.faults.conftest import bench_text, check_clean
from tests.faults.helpers import TimedStream, started, status_of
from tests.integration.stack import MODEL, Stack, chat_request, running_requests, stream_text


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
    while (
        fault_redis_client.xlen(keys.job_stream("SmolLM2-135M-Instruct")) < 3 and time.monotonic() < deadline
    ):
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


def wait_until(predicate, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Seconds until predicate() held; fails the test if it does not within `seconds`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, f"not within {seconds}s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_gateway_frozen_past_its_reply_stream_ttl_recovers_at_once(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=1)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(fault_stack.address))
    call = stub.StreamChatCompletion(chat_request(max_tokens=2000), timeout=40)  # 100 s at 20 tokens/s
    content = (chunk for chunk in call if chunk.choices[0].delta.content)
    next(content), next(content)
    [reply_stream] = list(fault_redis_client.scan_iter(f"{keys.PREFIX}:replies:*"))
    assert fault_stack.gateway is not None
    fault_stack.gateway.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # Frozen past the TTL: the reply stream expires and the worker aborts the job, whose last
        # events it cannot write (NOMKSTREAM).
        wait_until(lambda: not fault_redis_client.exists(reply_stream), 15)
        wait_until(lambda: running_requests(fault_stack.worker_metrics_ports[0]) == 0, 5)
    finally:
        fault_stack.gateway.send_signal(signal.SIGCONT)
    woke = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(content)
    in_flight_ended = time.monotonic() - woke
    assert status_of(caught.value) == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    unary = stub.ChatCompletion(chat_request(max_tokens=4), timeout=5)
    streamed = list(stub.StreamChatCompletion(chat_request(max_tokens=4), timeout=5))
    served = time.monotonic() - woke
    serving = health_pb2.HealthCheckResponse.SERVING
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == serving, 3)
    print(
        f"gateway SIGSTOP {woke - stopped:.1f}s -> after SIGCONT: in-flight stream"
        f" UNAVAILABLE in {in_flight_ended * 1000:.0f} ms, new unary + stream served after {served:.2f}s"
    )
    assert in_flight_ended < 3
    assert unary.choices[0].message.content == bench_text(4)
    assert stream_text(streamed) == bench_text(4)
    check_clean(fault_stack, fault_redis_client)


def model_health(channel: grpc.Channel, service: str) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2
    )
    return int(reply.status)


def test_a_model_without_a_live_worker_is_refused_after_the_grace(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    fault_stack.gateway_env.update(GATEWAY_NO_WORKER="refuse", GATEWAY_NO_WORKER_GRACE_SECONDS="2")
    fault_stack.start_gateway()  # no worker
    channel = grpc.insecure_channel(fault_stack.address)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    per_model = f"chat.v1.ChatService/{MODEL}"
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert model_health(channel, "") == serving  # the gateway itself serves
    wait_until(lambda: model_health(channel, per_model) == not_serving, 3)
    time.sleep(2)  # past the grace
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.ChatCompletion(chat_request(max_tokens=4), timeout=30)
    refused_in = time.monotonic() - start
    assert status_of(caught.value) == grpc.StatusCode.UNAVAILABLE
    assert "no worker serving model" in caught.value.details()
    with urllib.request.urlopen(f"{fault_stack.http_url}/readyz", timeout=5) as reply:
        assert reply.status == 200
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(f"{fault_stack.http_url}/readyz?model={MODEL}", timeout=5)
    assert not_ready.value.code == 503
    fault_stack.start_worker()
    became_serving = wait_until(lambda: model_health(channel, per_model) == serving, 30)
    reply = stub.ChatCompletion(chat_request(max_tokens=4), timeout=30)
    print(
        f"no live worker: refused UNAVAILABLE in {refused_in * 1000:.0f} ms;"
        f" model SERVING {became_serving:.1f}s after its worker was started"
    )
    assert refused_in < 1
    assert reply.choices[0].message.content == bench_text(4)
    assert fault_redis_client.xlen(keys.job_stream(MODEL)) == 0  # the refused call queued nothing
    check_clean(fault_stack, fault_redis_client)


def test_health_says_serving_as_soon_as_a_woken_gateway_serves_calls(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=1)
    channel = grpc.insecure_channel(fault_stack.address)
    assert fault_stack.gateway is not None
    fault_stack.gateway.send_signal(signal.SIGSTOP)
    time.sleep(13)  # past the reply stream's TTL, as measured on `make run`
    fault_stack.gateway.send_signal(signal.SIGCONT)
    woke = time.monotonic()
    for _ in range(3):
        assert stub.ChatCompletion(chat_request(max_tokens=4), timeout=10).choices[0].message.content
    served = time.monotonic() - woke
    statuses = [model_health(channel, service) for service in ("", "chat.v1.ChatService")]
    print(f"gateway SIGSTOP 13 s -> 3 calls served {served:.2f}s after SIGCONT, health then {statuses}")
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
    check_clean(fault_stack, fault_redis_client)
