"""Malformed jobs and events in Redis: logged, dead-lettered, answered; no process dies."""

import time

import grpc
import pytest
import redis

from chat.v1 import chat_pb2_grpc
from common import keys
from tests.faults.conftest import bench_text, check_clean
from tests.faults.helpers import TimedStream, only_job_request_id
from tests.integration.stack import MODEL, Stack, chat_request

GARBAGE = b"\xff\x00 definitely not a protobuf message \xfe"


def test_a_malformed_job_is_dead_lettered_and_its_caller_answered(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    # The test swaps the job's entry for another, which the gateway's look for lost jobs would
    # rightly take for a lost job if it came between the swap and the worker's answer.
    fault_stack.gateway_env["GATEWAY_LOST_JOB_CHECK_SECONDS"] = "3600"
    fault_stack.start_gateway()  # no worker yet: the job waits in the stream
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(fault_stack.address))
    call = stub.ChatCompletion.future(chat_request(max_tokens=4), timeout=30)
    stream = keys.job_stream(MODEL)
    while fault_redis_client.xlen(stream) < 1:
        time.sleep(0.02)
    [(entry_id, fields)] = fault_redis_client.xrange(stream)
    # Replace the job by one whose payload is garbage but whose routing fields are intact.
    fault_redis_client.xdel(stream, entry_id)
    fault_redis_client.xadd(stream, {**fields, keys.PAYLOAD_FIELD: GARBAGE})
    fault_stack.start_worker()
    with pytest.raises(grpc.RpcError) as caught:
        call.result()
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "could not be decoded" in caught.value.details()
    # The worker writes the Failed event before it moves the job to the dead letters (a job is
    # let go of only once its terminal event is in Redis), so the caller may hear first.
    end = time.monotonic() + 5
    while (
        not fault_redis_client.exists(keys.dead_letter_stream(keys.job_stream(MODEL)))
        and time.monotonic() < end
    ):
        time.sleep(0.02)
    [(_id, dead)] = fault_redis_client.xrange(keys.dead_letter_stream(keys.job_stream(MODEL)))
    assert dead[keys.PAYLOAD_FIELD] == GARBAGE and b"undecodable" in dead[b"reason"]
    fault_redis_client.delete(keys.dead_letter_stream(keys.job_stream(MODEL)))
    assert stub.ChatCompletion(chat_request(max_tokens=3)).choices[0].message.content == bench_text(3)
    check_clean(fault_stack, fault_redis_client)


def test_an_entry_without_any_fields_we_know_does_not_stop_the_worker(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    fault_stack.start_gateway()
    fault_stack.start_worker()
    fault_stack.wait_worker_ready()
    fault_redis_client.xadd(keys.job_stream(MODEL), {b"unexpected": b"1"})
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(fault_stack.address))
    assert stub.ChatCompletion(chat_request(max_tokens=3)).choices[0].message.content == bench_text(3)
    assert fault_stack.workers[0].poll() is None
    fault_redis_client.delete(keys.dead_letter_stream(keys.job_stream(MODEL)))
    check_clean(fault_stack, fault_redis_client)


def test_a_malformed_event_fails_its_call_and_nothing_else(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    fault_stack.start_gateway()
    fault_stack.start_worker(WORKER_BENCH_TOKENS_PER_SECOND="2")
    fault_stack.wait_worker_ready()
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(fault_stack.address))
    stream = TimedStream(stub, chat_request(max_tokens=100))
    stream.read(content_chunks=1)
    request_id = only_job_request_id(fault_redis_client)
    [reply_stream] = [k.decode() for k in fault_redis_client.scan_iter(f"{keys.PREFIX}:replies:*")]
    fault_redis_client.xadd(
        reply_stream, {keys.REQUEST_ID_FIELD: request_id.encode(), keys.PAYLOAD_FIELD: GARBAGE}
    )
    fault_redis_client.xadd(reply_stream, {keys.PAYLOAD_FIELD: GARBAGE})  # not even attributable
    with pytest.raises(grpc.RpcError) as caught:
        stream.read()
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "malformed event" in caught.value.details()
    assert fault_stack.gateway is not None and fault_stack.gateway.poll() is None
    assert stub.ChatCompletion(chat_request(max_tokens=2)).choices[0].message.content == bench_text(2)
    check_clean(fault_stack, fault_redis_client)
