"""One call, one trace: real gateway and worker processes export OTLP to a real OTLP/gRPC receiver.

A call made with a W3C `traceparent` (gRPC metadata or HTTP header) yields the gateway's server span
under the caller's span, each worker attempt's consumer span under (and linked to) the gateway's,
and, with vLLM, vLLM's own `llm_request` span under the worker's: one trace id throughout.
Each test has its own redis-server, so the session's vLLM worker takes none of these jobs.
"""

import asyncio
import json
import secrets
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio

from chat.v1 import chat_pb2_grpc
from common import keys
from devstack.otlp_receiver import OtlpReceiver, ReceivedSpan
from devstack.redis_server import RedisServer
from gateway import apikeys
from tests.integration.stack import (
    MODEL,
    Stack,
    chat_request,
    leaks,
    pending_jobs,
    print_log_tails,
    running_requests,
)

SERVER, CONSUMER = 2, 5  # opentelemetry.proto.trace.v1.Span.SpanKind
PROMPT = "The secret prompt text that must never reach a span."
BENCH_WORKER = {"WORKER_ENGINE": "bench", "WORKER_BENCH_TOKENS_PER_SECOND": "200"}


def otel_env(receiver: OtlpReceiver, service: str) -> dict[str, str]:
    # A short batch delay so the test need not wait the SDK's default 5 s for an export.
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


def new_ids() -> tuple[str, str]:
    """A caller's trace id and span id."""
    return secrets.token_hex(16), secrets.token_hex(8)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def traced_stack(tmp_path: Path, receiver: OtlpReceiver) -> Iterator[Stack]:
    """A gateway (API keys on) and nothing else yet; tests start the workers they need."""
    own_redis = RedisServer(tmp_path / "redis")
    own_redis.start()
    stack = Stack(
        own_redis,
        tmp_path,
        gateway_env={"GATEWAY_AUTH": "on", **otel_env(receiver, "chat-gateway")},
        worker_env={**BENCH_WORKER, **otel_env(receiver, "chat-worker")},
    )
    try:
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()
        own_redis.stop()
        print_log_tails(tmp_path, 15)


def new_key(stack: Stack, name: str) -> str:
    async def create() -> str:
        client = redis.asyncio.Redis.from_url(stack.redis_server.url)
        try:
            return await apikeys.create(client, name, [MODEL], 0, 0)
        finally:
            await client.aclose()

    return asyncio.run(create())


def in_trace(trace_id: str, *names: str) -> Callable[[list[ReceivedSpan]], bool]:
    def done(spans: list[ReceivedSpan]) -> bool:
        return all(any(s.trace_id == trace_id and s.name == n for s in spans) for n in names)

    return done


def one(spans: list[ReceivedSpan], trace_id: str, service: str) -> ReceivedSpan:
    [span] = [s for s in spans if s.trace_id == trace_id and s.service == service]
    return span


def check_clean(stack: Stack, timeout: float = 10.0) -> None:
    """No job left queued or pending, no cancel flag, no active engine request (API keys and their
    rate-limit windows are the test's own, and stay)."""
    own = tuple(f"stray key {keys.PREFIX}:{kind}" for kind in ("apikey", "ratelimit:", "applied:"))
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(stack.redis_server.url) as client:
        while True:
            problems = [p for p in leaks(client) if not p.startswith(own)]
            problems += [
                f"port {port}: active requests"
                for port in stack.worker_metrics_ports
                if running_requests(port)
            ]
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert not problems, problems


def exemplar_trace_ids(metrics_port: int) -> dict[str, set[str]]:
    """Trace ids on the gateway's histogram buckets, by metric, as a Prometheus scrape sees them."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{metrics_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    text = urllib.request.urlopen(request, timeout=5).read().decode()
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        if "_bucket{" in line and ' # {trace_id="' in line:
            metric = line.split("_bucket{")[0]
            found.setdefault(metric, set()).add(line.split(' # {trace_id="')[1].split('"')[0])
    return found


def test_a_traced_call_is_one_trace_through_gateway_and_worker(
    traced_stack: Stack, receiver: OtlpReceiver
) -> None:
    traced_stack.start_worker()
    key = new_key(traced_stack, "team-tracing")
    auth = ("authorization", f"Bearer {key}")
    with grpc.insecure_channel(traced_stack.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        stub.ChatCompletion(chat_request(max_tokens=1), metadata=[auth], timeout=60)  # worker ready
        trace_id, caller_span = new_ids()
        metadata = [auth, ("traceparent", traceparent(trace_id, caller_span)), ("tracestate", "caller=1")]
        chunks = list(
            stub.StreamChatCompletion(chat_request(PROMPT, max_tokens=8), metadata=metadata, timeout=60)
        )
    request_id = chunks[0].id.removeprefix("chatcmpl-")
    assert chunks[-1].choices[0].finish_reason == "length"

    spans = receiver.wait_for(in_trace(trace_id, f"chat {MODEL}", f"process {MODEL}"))
    gateway = one(spans, trace_id, "chat-gateway")
    worker = one(spans, trace_id, "chat-worker")
    # The caller's span is the gateway's parent; the gateway's is the worker's parent and link.
    assert (gateway.kind, gateway.parent_span_id) == (SERVER, caller_span)
    assert (worker.kind, worker.parent_span_id) == (CONSUMER, gateway.span_id)
    assert worker.links == ((trace_id, gateway.span_id),)
    a = gateway.attributes
    assert a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] == 8
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["chat.request_id"] == request_id == worker.attributes["chat.request_id"]
    assert a["chat.api_key.name"] == "team-tracing"
    assert a["chat.transport"] == "grpc" and a["rpc.grpc.status_code"] == "OK"
    assert 0 <= a["chat.queue_wait_seconds"] <= a["chat.time_to_first_token_seconds"]
    assert worker.attributes["chat.attempt"] == 1 and worker.attributes["chat.outcome"] == "finished"
    # Neither the key nor the prompt is in any span.
    dumped = json.dumps([s.attributes for s in spans], default=str)
    assert key not in dumped and "secret prompt" not in dumped

    # The gateway's TTFT and duration histograms carry the trace id as an exemplar.
    exemplars = exemplar_trace_ids(traced_stack.gateway_metrics_port)
    assert trace_id in exemplars["chat_gateway_time_to_first_token_seconds"]
    assert trace_id in exemplars["chat_gateway_request_duration_seconds"]
    check_clean(traced_stack)


def test_a_traceparent_header_on_http_continues_the_callers_trace(
    traced_stack: Stack, receiver: OtlpReceiver
) -> None:
    traced_stack.start_worker()
    key = new_key(traced_stack, "team-http")
    trace_id, caller_span = new_ids()
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    request = urllib.request.Request(
        f"{traced_stack.http_url}/openai/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "traceparent": traceparent(trace_id, caller_span),
        },
    )
    reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
    spans = receiver.wait_for(in_trace(trace_id, f"chat {MODEL}", f"process {MODEL}"))
    gateway = one(spans, trace_id, "chat-gateway")
    assert gateway.parent_span_id == caller_span
    assert gateway.attributes["chat.transport"] == "http"
    assert gateway.attributes["gen_ai.response.id"] == reply["id"]
    assert one(spans, trace_id, "chat-worker").parent_span_id == gateway.span_id
    check_clean(traced_stack)


def test_a_continuation_after_a_worker_death_is_another_span_of_the_same_trace(
    traced_stack: Stack, receiver: OtlpReceiver
) -> None:
    slow = {"WORKER_BENCH_TOKENS_PER_SECOND": "20"}
    for _ in range(2):
        traced_stack.start_worker(**slow)
    key = new_key(traced_stack, "team-takeover")
    auth = ("authorization", f"Bearer {key}")
    trace_id, caller_span = new_ids()
    client = redis.Redis.from_url(traced_stack.redis_server.url)
    with grpc.insecure_channel(traced_stack.address) as channel, client:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        stub.ChatCompletion(chat_request(max_tokens=1), metadata=[auth], timeout=60)  # workers ready
        metadata = [auth, ("traceparent", traceparent(trace_id, caller_span))]
        call = stub.StreamChatCompletion(chat_request(max_tokens=40), metadata=metadata, timeout=60)
        chunks = iter(call)
        text = "".join(next(chunks).choices[0].delta.content for _ in range(6))
        [entry] = pending_jobs(client)
        owner = entry["consumer"].decode()  # worker-N
        survivor = "worker-1" if owner == "worker-0" else "worker-0"
        traced_stack.workers[int(owner.split("-")[1])].send_signal(signal.SIGKILL)
        text += "".join(c.choices[0].delta.content for c in chunks)
    assert text == "".join(f"t{i} " for i in range(1, 41))

    spans = receiver.wait_for(in_trace(trace_id, f"chat {MODEL}", f"process {MODEL}"))
    gateway = one(spans, trace_id, "chat-gateway")
    # The killed worker never exported its span; the attempt that took over did, in the same trace.
    worker = one(spans, trace_id, "chat-worker")
    assert worker.parent_span_id == gateway.span_id
    assert worker.attributes["chat.attempt"] == 2
    assert worker.attributes["chat.worker_id"] == survivor
    assert worker.attributes["chat.continued_tokens"] >= 5
    assert gateway.attributes["gen_ai.usage.output_tokens"] == 40
    check_clean(traced_stack)


def test_tracing_off_exports_nothing(tmp_path: Path, receiver: OtlpReceiver) -> None:
    """No OTEL_* endpoint (the default): a traceparent is ignored and nothing reaches any receiver."""
    own_redis = RedisServer(tmp_path / "redis")
    own_redis.start()
    stack = Stack(own_redis, tmp_path, worker_env=dict(BENCH_WORKER))
    try:
        stack.start_gateway()
        stack.start_worker()
        trace_id, caller_span = new_ids()
        with grpc.insecure_channel(stack.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            metadata = [("traceparent", traceparent(trace_id, caller_span))]
            stub.ChatCompletion(chat_request(max_tokens=2), metadata=metadata, timeout=60)
        assert not exemplar_trace_ids(stack.gateway_metrics_port)
        assert "tracing on" not in (tmp_path / "gateway.log").read_text()
    finally:
        stack.stop()
        own_redis.stop()
    assert receiver.spans() == []


@pytest.mark.timeout(300)
def test_vllms_llm_request_span_lands_in_the_callers_trace(tmp_path: Path, receiver: OtlpReceiver) -> None:
    own_redis = RedisServer(tmp_path / "redis")
    own_redis.start()
    stack = Stack(
        own_redis,
        tmp_path,
        gateway_env=otel_env(receiver, "chat-gateway"),
        worker_env={
            "WORKER_ENGINE": "vllm",
            "WORKER_VLLM_MAX_MODEL_LEN": "2048",
            "WORKER_MAX_CONCURRENCY": "2",
            **otel_env(receiver, "chat-worker"),
        },
    )
    try:
        stack.start_gateway()
        stack.start_worker()
        stack.wait_worker_ready()
        trace_id, caller_span = new_ids()
        with grpc.insecure_channel(stack.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            metadata = [("traceparent", traceparent(trace_id, caller_span))]
            reply = stub.ChatCompletion(chat_request(max_tokens=3), metadata=metadata, timeout=60)
        assert reply.usage.completion_tokens > 0
        spans = receiver.wait_for(in_trace(trace_id, f"chat {MODEL}", f"process {MODEL}", "llm_request"))
    finally:
        stack.stop()
        own_redis.stop()
        print_log_tails(tmp_path, 15)
    gateway = one(spans, trace_id, "chat-gateway")
    # vLLM's span comes from the worker process too (its service name); the names tell them apart.
    [worker] = [s for s in spans if s.trace_id == trace_id and s.name == f"process {MODEL}"]
    [engine] = [s for s in spans if s.trace_id == trace_id and s.name == "llm_request"]
    print(
        "trace:",
        [(s.service, s.name, s.span_id, s.parent_span_id) for s in spans if s.trace_id == trace_id],
    )
    assert gateway.parent_span_id == caller_span
    assert worker.parent_span_id == gateway.span_id
    assert engine.parent_span_id == worker.span_id  # vLLM traced under the worker's attempt
    assert engine.attributes["gen_ai.request.id"] == gateway.attributes["chat.request_id"]
