"""The shape of chat.v1 responses, end to end through Redis and a real model."""

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chat.v1 import chat_pb2, chat_pb2_grpc
from tests.integration.conftest import ENGINE_CONTEXT_WINDOW
from tests.integration.stack import MODEL, Stack, chat_request, stream_text


def test_unary_completion_has_the_reference_shape(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    reply = stub.ChatCompletion(chat_request("Name three colors.", max_tokens=12, temperature=0))
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.created > 1_700_000_000
    assert reply.system_fingerprint.startswith("fp_")
    [choice] = reply.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.queue_time >= 0 and usage.prompt_time > 0 and usage.completion_time >= 0
    assert usage.total_time == usage.prompt_time + usage.completion_time


def test_stream_starts_with_role_and_ends_with_finish_reason_and_usage(
    stub: chat_pb2_grpc.ChatServiceStub,
) -> None:
    chunks = list(stub.StreamChatCompletion(chat_request("Name three colors.", max_tokens=12, temperature=0)))
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert not first.choices[0].delta.HasField("content")
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.HasField("usage") and last.usage.completion_tokens > 0
    assert all(not c.HasField("usage") and not c.choices[0].finish_reason for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert stream_text(chunks).strip()


def test_unary_and_stream_give_the_same_greedy_text(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    request = chat_request("What is the capital of France?", max_tokens=16, temperature=0)
    unary = stub.ChatCompletion(request)
    streamed = list(stub.StreamChatCompletion(request))
    assert stream_text(streamed) == unary.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == unary.usage.completion_tokens


def test_list_models_reports_the_bundled_model_with_the_engines_window(
    stub: chat_pb2_grpc.ChatServiceStub,
) -> None:
    reply = stub.ListModels(chat_pb2.ListModelsRequest())
    assert reply.object == "list"
    [model] = reply.data
    # The worker's engine runs 4,096 tokens (WORKER_VLLM_MAX_MODEL_LEN), not the model's 8,192.
    assert model.id == MODEL and model.object == "model" and model.context_window == ENGINE_CONTEXT_WINDOW


def test_health_and_reflection_are_served(stack: Stack) -> None:
    with grpc.insecure_channel(stack.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "chat.v1.ChatService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in reply.list_services_response.service}
        assert {"chat.v1.ChatService", "grpc.health.v1.Health"} <= names
