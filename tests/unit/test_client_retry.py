"""The client retries calls refused with RESOURCE_EXHAUSTED after the server's RetryInfo delay.

A fake ChatService (real gRPC server in-process, scripted answers) stands in for the gateway.
"""

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client import Client, RateLimitError


class FakeRateLimitedService(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, refusals: int, delay: float) -> None:
        self.refusals, self.delay, self.calls, self.metadata = refusals, delay, [], []

    def ChatCompletion(self, request, context):  # type: ignore[no-untyped-def]
        self.calls.append(time.monotonic())
        self.metadata.append(dict(context.invocation_metadata()))
        if len(self.calls) <= self.refusals:
            retry = error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(nanos=int(self.delay * 1e9))
            )
            detail = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="over the limit")
            detail.details.add().Pack(retry)
            context.abort_with_status(rpc_status.to_status(detail))
        choice = chat_pb2.Choice(
            message=chat_pb2.AssistantMessage(role="assistant", content="ok"), finish_reason="stop"
        )
        return chat_pb2.ChatCompletionResponse(id="x", choices=[choice], usage=chat_pb2.Usage())


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[tuple[FakeRateLimitedService, str]]:
    service = FakeRateLimitedService(*request.param)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("fake", [(2, 0.2)], indirect=True)
def test_client_waits_the_retry_delay_and_retries(fake: tuple[FakeRateLimitedService, str]) -> None:
    service, address = fake
    with Client(address, api_key="sk-test", max_retries=2) as client:
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "ok"
    gaps = [b - a for a, b in zip(service.calls, service.calls[1:], strict=False)]
    assert len(service.calls) == 3 and all(gap >= 0.2 for gap in gaps)
    assert all(m["authorization"] == "Bearer sk-test" for m in service.metadata)


@pytest.mark.parametrize("fake", [(2, 0.01)], indirect=True)
def test_client_keeps_one_idempotency_key_across_the_retries_of_a_call(
    fake: tuple[FakeRateLimitedService, str],
) -> None:
    service, address = fake
    hi = [{"role": "user", "content": "hi"}]
    with Client(address, max_retries=2) as client:
        client.chat.completions.create(model="m", messages=hi)
        client.chat.completions.create(model="m", messages=hi, idempotency_key="mine")
    first, second = service.metadata[:3], service.metadata[3:]
    assert len({m["idempotency-key"] for m in first}) == 1  # three attempts, one logical call
    assert [m["idempotency-key"] for m in second] == ["mine"]


@pytest.mark.parametrize("fake", [(5, 0.05)], indirect=True)
def test_client_gives_up_after_max_retries(fake: tuple[FakeRateLimitedService, str]) -> None:
    service, address = fake
    with Client(address, max_retries=1) as client, pytest.raises(RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.retry_after == pytest.approx(0.05) and len(service.calls) == 2


class FakeExhaustedService(chat_pb2_grpc.ChatServiceServicer):
    """RESOURCE_EXHAUSTED without RetryInfo: waiting would not help (e.g. a request over a hard limit)."""

    def __init__(self) -> None:
        self.calls = 0

    def ChatCompletion(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "request larger than the limit")


def test_client_does_not_retry_a_refusal_without_retry_info() -> None:
    service = FakeExhaustedService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", max_retries=5) as client, pytest.raises(RateLimitError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    finally:
        server.stop(None)
    assert service.calls == 1
