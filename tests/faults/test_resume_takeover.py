"""A stream resumed while its worker is SIGKILLed: the resume follows the job onto the worker that
takes it over, and the text received before plus the text resumed is the whole reply, once.

The takeover (claim timeout 2 s, then the next look for orphans) outlasts the gateway's resume
grace period in these stacks (2 s): only the lease that a resumed call holds keeps the job alive.
"""

import signal
from collections.abc import Iterator
from subprocess import Popen

import redis

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client import Client
from tests.faults.conftest import bench_text, check_clean
from tests.faults.helpers import owner_of_only_job, started
from tests.faults.test_worker_faults import continued_tokens, generated_tokens
from tests.integration.stack import MODEL, Stack, chat_request, scrape
from tests.tcp_proxy import TcpProxy

MAX_TOKENS = 60  # 3 s at the benchmark engine's 20 tokens per second
READ_BEFORE = 10  # text chunks received before the caller goes


def resume(
    stub: chat_pb2_grpc.ChatServiceStub, completion_id: str, after: int
) -> Iterator[chat_pb2.ChatCompletionChunk]:
    request = chat_pb2.ResumeChatCompletionRequest(id=completion_id, starting_after=after)
    return stub.ResumeChatCompletion(request, timeout=60)


def survivor_of(stack: Stack, owner: Popen[bytes]) -> int:
    [survivor] = [i for i, w in enumerate(stack.workers) if w is not owner]
    return survivor


def assert_continued_not_regenerated(stack: Stack, survivor: int, generated_before: float) -> None:
    """The other worker continued the job and generated only the rest of it."""
    continued_from = continued_tokens(stack, survivor)
    generated = generated_tokens(stack.worker_metrics_ports[survivor]) - generated_before
    assert continued_from >= READ_BEFORE and generated == MAX_TOKENS - continued_from
    outcomes = scrape(stack.gateway_metrics_port)
    assert outcomes[f'chat_gateway_resumed_streams_total{{model="{MODEL}",outcome="continued"}}'] == 1


def test_a_stream_resumed_across_a_worker_takeover_gets_the_rest_once(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    stub = started(fault_stack, workers=2)
    call = stub.StreamChatCompletion(chat_request(max_tokens=MAX_TOKENS), timeout=60)
    before: list[chat_pb2.ChatCompletionChunk] = []
    for chunk in call:
        before.append(chunk)
        if sum(bool(c.choices[0].delta.content) for c in before) == READ_BEFORE:
            break
    owner = owner_of_only_job(fault_stack, fault_redis_client)
    survivor = survivor_of(fault_stack, owner)
    generated_before = generated_tokens(fault_stack.worker_metrics_ports[survivor])
    call.cancel()  # the caller goes, as if its connection dropped: its job runs on, detached
    owner.send_signal(signal.SIGKILL)

    cursor = before[-1].sequence_number
    resumed = list(resume(stub, before[-1].id, cursor))

    text = "".join(c.choices[0].delta.content for c in before + resumed)
    assert text == bench_text(MAX_TOKENS)  # nothing lost, nothing twice
    assert all(c.sequence_number > cursor for c in resumed)
    assert not any(c.choices[0].delta.HasField("role") for c in resumed)
    assert resumed[-1].choices[0].finish_reason == "length"
    assert resumed[-1].usage.completion_tokens == MAX_TOKENS
    assert_continued_not_regenerated(fault_stack, survivor, generated_before)
    check_clean(fault_stack, fault_redis_client)


def test_the_client_resumes_by_itself_across_a_cut_and_a_worker_takeover(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    started(fault_stack, workers=2)
    proxy_cut = False
    with TcpProxy(fault_stack.port) as proxy, Client(f"127.0.0.1:{proxy.port}") as client:
        request = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
        chunks = []
        for chunk in client.chat.completions.create(stream=True, max_tokens=MAX_TOKENS, **request):
            chunks.append(chunk)
            if sum(bool(c.choices[0].delta.content) for c in chunks) == READ_BEFORE and not proxy_cut:
                owner = owner_of_only_job(fault_stack, fault_redis_client)
                survivor = survivor_of(fault_stack, owner)
                generated_before = generated_tokens(fault_stack.worker_metrics_ports[survivor])
                owner.send_signal(signal.SIGKILL)
                proxy.cut()
                proxy_cut = True
    assert "".join(c.choices[0].delta.content for c in chunks) == bench_text(MAX_TOKENS)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is not None
    resumes = 'chat_gateway_requests_total{code="OK",model="",rpc="ResumeChatCompletion",transport="grpc"}'
    assert scrape(fault_stack.gateway_metrics_port)[resumes] == 1  # one resume took it to the end
    assert_continued_not_regenerated(fault_stack, survivor, generated_before)
    check_clean(fault_stack, fault_redis_client)
