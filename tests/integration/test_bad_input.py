"""Every invalid request is refused before anything reaches Redis, naming the field and the rule."""

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chat.v1 import chat_pb2, chat_pb2_grpc
from tests.integration.stack import chat_request, jobs_ever_queued

LONG_TEXT = "word " * 9000  # about 9,000 tokens: more than the model's 8,192-token context window
# About 5,000 tokens: fits the model's window but not the 4,096 tokens the worker's engine runs with.
ENGINE_TOO_LONG_TEXT = "word " * 5000

CASES = {
    "unknown model": (dict(model="gpt-nope"), grpc.StatusCode.NOT_FOUND, "model", "gpt-nope"),
    "missing model": (dict(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model", "required"),
    "no messages": (dict(messages=[]), grpc.StatusCode.INVALID_ARGUMENT, "messages", "at least one"),
    "bad role": (
        dict(messages=[chat_pb2.ChatMessage(role="robot", content="x")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].role",
        "'robot'",
    ),
    "temperature too high": (
        dict(temperature=2.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
        "[0, 2]",
    ),
    "temperature negative": (
        dict(temperature=-0.1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
        "[0, 2]",
    ),
    "temperature nan": (
        dict(temperature=float("nan")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
        "nan",
    ),
    "top_p zero": (dict(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p", "(0, 1]"),
    "top_p above one": (dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p", "(0, 1]"),
    "frequency_penalty too high": (
        dict(frequency_penalty=2.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "frequency_penalty",
        "[-2, 2], got 2.5",
    ),
    "presence_penalty too low": (
        dict(presence_penalty=-2.01),
        grpc.StatusCode.INVALID_ARGUMENT,
        "presence_penalty",
        "[-2, 2], got -2.01",
    ),
    "presence_penalty infinite": (
        dict(presence_penalty=float("inf")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "presence_penalty",
        "got inf",
    ),
    "max_tokens zero": (dict(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens", "at least 1"),
    "max_tokens negative": (
        dict(max_tokens=-5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens",
        "at least 1",
    ),
    "max_tokens beyond context": (
        dict(max_tokens=9000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens",
        "context window",
    ),
    "five stop sequences": (
        dict(stop=["a", "b", "c", "d", "e"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "stop",
        "at most 4",
    ),
    "empty stop sequence": (dict(stop=["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "stop[1]", "empty"),
    "unknown response format": (
        dict(response_format="yaml"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "response_format.type",
        "'yaml'",
    ),
    "json mode with stop": (
        dict(response_format="json_object", stop=["}"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "stop",
        "json_object",
    ),
    "prompt beyond context": (
        dict(messages=[chat_pb2.ChatMessage(role="user", content=LONG_TEXT)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages",
        "context window",
    ),
    "prompt beyond the engine's context": (
        dict(messages=[chat_pb2.ChatMessage(role="user", content=ENGINE_TOO_LONG_TEXT)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages",
        "context window of 4096 tokens",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("rpc", ["ChatCompletion", "StreamChatCompletion"])
def test_invalid_request_is_refused_before_queueing(
    stub: chat_pb2_grpc.ChatServiceStub, redis_client: redis.Redis, case: str, rpc: str
) -> None:
    fields, code, field, words = CASES[case]
    queued_before = jobs_ever_queued(redis_client)
    request = chat_request(max_tokens=4, **fields) if "max_tokens" not in fields else chat_request(**fields)
    with pytest.raises(grpc.RpcError) as caught:
        reply = getattr(stub, rpc)(request, timeout=10)
        list(reply) if rpc == "StreamChatCompletion" else None
    error = caught.value
    assert error.code() == code
    assert f"`{field}`" in error.details() and words in error.details()
    status = rpc_status.from_call(error)
    bad_request = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == field
    assert jobs_ever_queued(redis_client) == queued_before
