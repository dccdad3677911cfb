"""HTTP bodies in the Groq/OpenAI dialect become chat.v1 requests, or errors naming the parameter."""

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.errors import InvalidField, MalformedRequest, UnsupportedParameter
from gateway.http import _errors_as_json, parse_request

IMAGE = "messages[0].content[0].type"
BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_full_body_maps_to_the_request_and_options() -> None:
    request, options = parse_request(
        {
            **BASE,
            "temperature": 0.5, "top_p": 1, "max_completion_tokens": 9, "seed": -3, "stop": ", 6",
            "user": "u", "stream": True, "stream_options": {"include_usage": True}, "n": 3,
            "response_format": {"type": "json_object"}, "frequency_penalty": 1, "presence_penalty": -0.5,
            "logprobs": True, "top_logprobs": 3, "service_tier": "auto",
        }
    )  # fmt: skip
    assert request.model == "m" and request.messages[0].content == "hi"
    assert request.temperature == 0.5 and request.top_p == 1.0 and request.max_tokens == 9
    assert request.frequency_penalty == 1.0 and request.presence_penalty == -0.5
    assert request.seed == -3 and list(request.stop) == [", 6"] and request.user == "u"
    assert request.response_format.type == "json_object"
    assert (
        request.logprobs and request.top_logprobs == 3 and request.n == 3 and request.service_tier == "auto"
    )
    assert (
        options.stream
        and options.include_usage
        and options.renamed == {"max_tokens": "max_completion_tokens"}
    )


def test_nulls_mean_unset_and_max_tokens_is_the_older_alias() -> None:
    request, options = parse_request(
        {**BASE, "stop": None, "temperature": None, "max_tokens": 5, "tools": None, "presence_penalty": None}
    )
    assert not request.HasField("temperature") and list(request.stop) == [] and request.max_tokens == 5
    assert not request.HasField("presence_penalty")
    assert not options.stream and options.renamed == {}


def test_text_parts_are_joined_and_json_schema_travels_as_text() -> None:
    schema = {"type": "object"}
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    json_schema = {"name": "x", "schema": schema, "strict": True}
    request, _ = parse_request(
        {
            **BASE,
            "messages": [{"role": "user", "content": parts}],
            "response_format": {"type": "json_schema", "json_schema": json_schema},
        }
    )
    assert request.messages[0].content == "ab"
    assert json.loads(request.response_format.json_schema.schema) == schema
    assert request.response_format.json_schema.strict


@pytest.mark.parametrize(
    ("extra", "error", "param"),
    [
        ({"functions": []}, UnsupportedParameter, "functions"),
        ({"tools": {}}, InvalidField, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, InvalidField, "tools[0].function.parameters"),  # noqa: E501
        ({"tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]}, UnsupportedParameter, "tools[0].function.returns"),  # noqa: E501
        ({"tool_choice": 1}, InvalidField, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, InvalidField, "tool_choice.function"),
        ({"messages": [{"role": "assistant", "tool_calls": {}}]}, InvalidField, "messages[0].tool_calls"),
        ({"messages": [{"role": "tool", "tool_call_id": 5, "content": "x"}]}, InvalidField, "messages[0].tool_call_id"),  # noqa: E501
        ({"n": "2"}, InvalidField, "n"),
        ({"service_tier": 1}, InvalidField, "service_tier"),
        ({"n": 1.5}, InvalidField, "n"),
        ({"presence_penalty": "high"}, InvalidField, "presence_penalty"),
        ({"presence_penalty": [1]}, InvalidField, "presence_penalty"),
        ({"frequency_penalty": False}, InvalidField, "frequency_penalty"),
        ({"frequency_penalty": {"value": 1}}, InvalidField, "frequency_penalty"),
        ({"frequency_penalty": 10**400}, InvalidField, "frequency_penalty"),  # float() overflows
        ({"temperature": -(10**400)}, InvalidField, "temperature"),
        ({"logprobs": 1}, InvalidField, "logprobs"),
        ({"top_logprobs": 2.5}, InvalidField, "top_logprobs"),
        ({"top_logprobs": 1 << 40}, InvalidField, "top_logprobs"),
        ({"unknown": 1}, UnsupportedParameter, "unknown"),
        ({"temperature": "hot"}, InvalidField, "temperature"),
        ({"temperature": True}, InvalidField, "temperature"),
        ({"max_tokens": 1.5}, InvalidField, "max_tokens"),
        ({"max_completion_tokens": 2, "max_tokens": 3}, InvalidField, "max_completion_tokens"),
        ({"seed": 1 << 70}, InvalidField, "seed"),
        ({"stop": [1]}, InvalidField, "stop"),
        ({"stream": "yes"}, InvalidField, "stream"),
        ({"stream_options": {"include_usage": True}}, InvalidField, "stream_options"),
        ({"stream": True, "stream_options": {"other": 1}}, UnsupportedParameter, "stream_options.other"),
        ({"response_format": {"type": "json_object", "x": 1}}, UnsupportedParameter, "response_format.x"),
        ({"messages": [{"role": "user", "audio": {}}]}, UnsupportedParameter, "messages[0].audio"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, UnsupportedParameter, IMAGE),
        ({"messages": "hi"}, InvalidField, "messages"),
    ],
)  # fmt: skip
def test_each_refusal_names_the_parameter(
    extra: dict[str, Any], error: type[InvalidField], param: str
) -> None:
    with pytest.raises(error) as caught:
        parse_request({**BASE, **extra})
    assert caught.value.field == param


def test_a_body_that_is_not_an_object_is_malformed() -> None:
    with pytest.raises(MalformedRequest):
        parse_request([BASE])


async def test_a_client_gone_mid_stream_is_not_answered_as_a_gateway_bug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A write to a client that reset the connection: no error log, no second response on a
    # stream that has already started; aiohttp ends the request quietly.
    async def handler(request: web.Request) -> web.StreamResponse:
        raise ConnectionResetError("Cannot write to closing transport")

    with pytest.raises(ConnectionResetError):
        await _errors_as_json(make_mocked_request("POST", "/v1/chat/completions"), handler)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_bug_in_a_handler_is_an_internal_error_in_the_api_shape() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise KeyError("bug")

    response = await _errors_as_json(make_mocked_request("POST", "/v1/chat/completions"), handler)
    assert response.status == 500
    assert json.loads(response.body)["error"]["type"] == "api_error"  # type: ignore[attr-defined,arg-type]
