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
) -> chat_pb2.ChatCompletionRequest:
    request = chat_pb2.ChatCompletionRequest(model=model, user=user or "")
    for m in messages:
        message = request.messages.add(role=m.get("role", ""), content=m.get("content") or "")
        if m.get("name") is not None:
            message.name = m["name"]
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


def _set_json_schema(target: chat_pb2.JsonSchema, schema: Mapping[str, Any]) -> None:
    """The reference's {"name", "description", "schema": {...}, "strict"}; the schema travels as JSON text."""
    target.name = schema.get("name", "")
    target.description = schema.get("description") or ""
    body = schema.get("schema")
    target.schema = body if isinstance(body, str) else json.dumps(body) if body is not None else ""
    if schema.get("strict") is not None:
        target.strict = bool(schema["strict"])
