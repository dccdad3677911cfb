"""Builds a chat.v1 request from the reference SDK's keyword arguments."""

import json
from collections.abc import Iterable, Mapping
from typing import Any

from chat.v1 import chat_pb2

MessageLike = Mapping[str, Any]


def build_request(
    *,
    model: str,
    messages: Iterable[MessageLike],
    temperature: float | None = None,
    max_tokens: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    response_format: Mapping[str, Any] | None = None,
    user: str | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    logprobs: bool | None = None,
    top_logprobs: int | None = None,
    n: int | None = None,
    service_tier: str | None = None,
    tools: Iterable[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
) -> chat_pb2.ChatCompletionRequest:
    request = chat_pb2.ChatCompletionRequest(model=model, user=user or "")
    for m in messages:
        m = _as_mapping(m)
        message = request.messages.add(role=m.get("role", ""), content=m.get("content") or "")
        if m.get("name") is not None:
            message.name = m["name"]
        for call in m.get("tool_calls") or ():
            call = _as_mapping(call)
            function = _as_mapping(call.get("function") or {})
            message.tool_calls.add(
                id=call.get("id", ""),
                type=call.get("type", "function"),
                function=chat_pb2.FunctionCall(
                    name=function.get("name", ""), arguments=function.get("arguments", "")
                ),
            )
        message.tool_call_id = m.get("tool_call_id") or ""
    for tool in tools or ():
        function = tool.get("function") or {}
        parameters = function.get("parameters")
        request.tools.add(
            type=tool.get("type", ""),
            function=chat_pb2.FunctionDefinition(
                name=function.get("name", ""),
                description=function.get("description") or "",
                parameters=parameters
                if isinstance(parameters, str)
                else json.dumps(parameters)
                if parameters
                else "",
            ),
        )
    if isinstance(tool_choice, str):
        request.tool_choice.mode = tool_choice
    elif tool_choice is not None:
        request.tool_choice.mode = "function"
        request.tool_choice.function_name = (tool_choice.get("function") or {}).get("name", "")
    if parallel_tool_calls is not None:
        request.parallel_tool_calls = parallel_tool_calls
    # The SDK's None means "not set", as the proto's optional fields have it.
    scalars = {
        "temperature": temperature,
        "max_tokens": max_tokens,
        "top_p": top_p,
        "seed": seed,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
        "n": n,
        "service_tier": service_tier,
    }
    for name, value in scalars.items():
        if value is not None:
            setattr(request, name, value)
    if stop is not None:
        request.stop.extend([stop] if isinstance(stop, str) else stop)
    if response_format is not None:
        request.response_format.type = response_format.get("type", "")
        if (schema := response_format.get("json_schema")) is not None:
            _set_json_schema(request.response_format.json_schema, schema)
    return request


def _as_mapping(value: Any) -> Mapping[str, Any]:
    """A dict as it is; a response's message or tool call (sent back in the next turn) as a dict."""
    if isinstance(value, Mapping):
        return value
    return {
        name: _as_mapping(v) if hasattr(v, "__dataclass_fields__") else v for name, v in vars(value).items()
    }


def _set_json_schema(target: chat_pb2.JsonSchema, schema: Mapping[str, Any]) -> None:
    """The reference's {"name", "description", "schema": {...}, "strict"}; the schema travels as JSON text."""
    target.name = schema.get("name", "")
    target.description = schema.get("description") or ""
    body = schema.get("schema")
    target.schema = body if isinstance(body, str) else json.dumps(body) if body is not None else ""
    if schema.get("strict") is not None:
        target.strict = bool(schema["strict"])
