"""JSON mode: decoding constrained by xgrammar; cut-off output is refused like the reference's 400."""

import json

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chat.v1 import chat_pb2, chat_pb2_grpc
from tests.integration.stack import chat_request, stream_text

SYSTEM = chat_pb2.ChatMessage(role="system", content="You are a data API that responds in JSON.")


def json_request(content: str, **fields: object) -> chat_pb2.ChatCompletionRequest:
    user = chat_pb2.ChatMessage(role="user", content=content)
    return chat_request(messages=[SYSTEM, user], response_format="json_object", **fields)


def test_unary_json_mode_returns_a_json_object(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    reply = stub.ChatCompletion(
        # Prompts the small bundled model answers briefly (asked to describe a cat, it nests forever).
        json_request(
            "Give me a JSON object with the keys city and country for Paris.", max_tokens=100, temperature=0
        )
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    assert reply.choices[0].finish_reason == "stop"


def test_streamed_json_mode_returns_a_json_object(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    chunks = list(
        stub.StreamChatCompletion(
            json_request("What is the capital of France? Answer in JSON.", max_tokens=100, temperature=0)
        )
    )
    assert isinstance(json.loads(stream_text(chunks)), dict)


def test_sampled_json_mode_still_parses(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    request = json_request(
        "Give a JSON object with a city and its country.", max_tokens=100, temperature=1.0, seed=3
    )
    assert isinstance(json.loads(stub.ChatCompletion(request).choices[0].message.content), dict)


@pytest.mark.parametrize("streaming", [False, True])
def test_json_cut_off_by_max_tokens_fails_with_json_validate_failed(
    stub: chat_pb2_grpc.ChatServiceStub, streaming: bool
) -> None:
    request = json_request("Describe a cat with name and age.", max_tokens=4, temperature=0)
    with pytest.raises(grpc.RpcError) as caught:
        if streaming:
            list(stub.StreamChatCompletion(request))
        else:
            stub.ChatCompletion(request)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "JSON" in error.details()
    status = rpc_status.from_call(error)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    assert info.reason == "json_validate_failed"
    assert info.metadata["failed_generation"].lstrip().startswith("{")
