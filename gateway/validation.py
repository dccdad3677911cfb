"""Request validation: a public request becomes a ValidRequest or an InvalidField error.

Pure: no gRPC server and no Redis here. Only a ValidRequest can be queued
(queue.JobQueue.submit takes nothing else), so nothing unchecked reaches a worker.
Each rule raises its own error naming the field and the rule.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from chat.v1 import chat_pb2
from common.models import Message
from gateway.catalog import ModelCatalog, ServedModel
from gateway.config import GatewaySettings
from gateway.errors import InvalidField, ModelNotFound, UnsupportedParameter, shown
from gateway.json_schemas import parse_schema
from gateway.tiers import ON_DEMAND, SERVICE_TIERS
from gateway.tools import ToolUse, check_tool_turns, check_tools, tools_chars

ROLES = ("system", "user", "assistant", "tool")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20  # as the reference; vLLM's max_logprobs defaults to it too
_UINT64 = (1 << 64) - 1


@dataclass(frozen=True)
class ValidRequest:
    model: str
    prompt_token_ids: list[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None  # as uint64
    stop: tuple[str, ...]
    json_mode: bool  # also set with json_schema: the reply is a JSON object either way
    user: str
    json_schema: str = ""  # JSON text of the schema the reply must follow; empty = none
    frequency_penalty: float = 0.0  # in [-2, 2]; 0 = none
    presence_penalty: float = 0.0  # in [-2, 2]; 0 = none
    logprobs: bool = False  # return each generated token's log probability
    top_logprobs: int = 0  # with logprobs: and this many of the most likely tokens at each position
    n: int = 1  # choices to generate, each up to max_tokens
    prompt_cache_key: str = ""  # the caller's affinity key (gateway/placement.py); "" = none
    service_tier: str = ON_DEMAND  # the tier that serves it: ON_DEMAND or FLEX
    tools: ToolUse | None = None  # the tools offered (rendered into the prompt); None: plain text
    # The call's trace context (W3C headers) for the job; set by the relay, empty when not traced.
    trace_context: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Limits:
    """Hard limits on what one request may carry (GATEWAY_MAX_*).

    Every string a caller controls is bounded, since each queued job is kept in Redis until
    it ends: contents by max_prompt_chars in all, and each of the others on its own.
    """

    max_messages: int = 256
    max_prompt_chars: int = 200_000
    max_stop_chars: int = 256  # per stop sequence
    max_name_chars: int = 64  # per message name
    max_user_chars: int = 256
    max_choices: int = 8  # largest n

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> "Limits":
        return cls(
            max_messages=settings.max_messages,
            max_prompt_chars=settings.max_prompt_chars,
            max_stop_chars=settings.max_stop_chars,
            max_name_chars=settings.max_name_chars,
            max_user_chars=settings.max_user_chars,
            max_choices=settings.max_choices,
        )


def validate(
    request: chat_pb2.ChatCompletionRequest,
    catalog: ModelCatalog,
    default_max_tokens: int,
    limits: Limits = Limits(),
) -> ValidRequest:
    model = _check_model(request.model, catalog)
    _check_size(request, limits)
    if not model.supports_tools:
        _refuse_tool_turns(request.messages, model.name)
    messages = _check_messages(request.messages, limits)
    temperature = _check_range(request, "temperature", 1.0, low=0.0, high=2.0, low_open=False)
    top_p = _check_range(request, "top_p", 1.0, low=0.0, high=1.0, low_open=True)
    frequency_penalty = _check_range(request, "frequency_penalty", 0.0, low=-2.0, high=2.0, low_open=False)
    presence_penalty = _check_range(request, "presence_penalty", 0.0, low=-2.0, high=2.0, low_open=False)
    stop = _check_stop(list(request.stop), limits)
    top_logprobs = _check_top_logprobs(request)
    service_tier = ON_DEMAND
    if request.HasField("service_tier"):
        if request.service_tier not in SERVICE_TIERS:
            raise UnsupportedParameter(
                "service_tier",
                f"must be one of {', '.join(SERVICE_TIERS)}, got {shown(request.service_tier)}",
            )
        service_tier = SERVICE_TIERS[request.service_tier]
    n = request.n if request.HasField("n") else 1
    if not 1 <= n <= limits.max_choices:
        raise InvalidField("n", f"must be in [1, {limits.max_choices}], got {n}")
    _check_length("user", request.user, limits.max_user_chars)
    _check_length("prompt_cache_key", request.prompt_cache_key, limits.max_user_chars)
    json_mode = _check_response_format(request)
    json_schema = _check_json_schema(request)
    if json_mode and stop:
        raise InvalidField("stop", f"cannot be used with response_format {request.response_format.type}")
    tools = check_tools(request, model.supports_tools, model.name)
    if tools is not None and json_mode:
        raise InvalidField("response_format", "cannot be combined with tools (a reply is text or tool calls)")
    if tools is not None and tools.choice != "auto" and stop:
        # As with JSON mode: a stop sequence inside the calls' JSON would cut them.
        raise InvalidField("stop", f"cannot be used with tool_choice {tools.choice}")
    if request.HasField("max_tokens") and request.max_tokens < 1:
        raise InvalidField("max_tokens", f"must be at least 1, got {request.max_tokens}")
    prompt = model.render(messages, tools.definitions if tools is not None else ())
    room = model.context_window - len(prompt)
    if room < 1:
        raise InvalidField(
            "messages",
            f"make a prompt of {len(prompt)} tokens, which leaves no room in the context window"
            f" of {model.context_window} tokens",
        )
    if request.HasField("max_tokens"):
        if request.max_tokens > room:
            raise InvalidField(
                "max_tokens",
                f"must fit the context window: prompt {len(prompt)} + max_tokens {request.max_tokens}"
                f" exceeds {model.context_window} tokens",
            )
        max_tokens = request.max_tokens
    else:
        max_tokens = min(default_max_tokens, room)
    return ValidRequest(
        model=model.name,
        prompt_token_ids=prompt,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=request.seed & _UINT64 if request.HasField("seed") else None,
        stop=stop,
        json_mode=json_mode,
        user=request.user,
        prompt_cache_key=request.prompt_cache_key,
        json_schema=json_schema,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logprobs=request.logprobs,
        top_logprobs=top_logprobs,
        n=n,
        service_tier=service_tier,
        tools=tools,
    )


def _check_model(name: str, catalog: ModelCatalog) -> ServedModel:
    if not name:
        raise InvalidField("model", "is required")
    model = catalog.get(name)
    if model is None:
        raise ModelNotFound(name, catalog.names)
    return model


def _check_size(request: chat_pb2.ChatCompletionRequest, limits: Limits) -> None:
    # Checked before tokenizing, so an oversized prompt costs no tokenizer time.
    if len(request.messages) > limits.max_messages:
        raise InvalidField(
            "messages", f"may hold at most {limits.max_messages} messages, got {len(request.messages)}"
        )
    chars = sum(len(m.content) for m in request.messages) + tools_chars(request)
    if chars > limits.max_prompt_chars:
        raise InvalidField(
            "messages", f"may hold at most {limits.max_prompt_chars} characters in all, got {chars}"
        )


def _check_length(field: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise InvalidField(field, f"may be at most {max_chars} characters long, got {len(value)}")


def _check_messages(messages: Sequence[chat_pb2.ChatMessage], limits: Limits) -> list[Message]:
    if not messages:
        raise InvalidField("messages", "must contain at least one message")
    checked = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidField(
                f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {shown(message.role)}"
            )
        name = message.name if message.HasField("name") and message.name else None
        if name is not None:
            _check_length(f"messages[{i}].name", name, limits.max_name_chars)
        checked.append(Message(message.role, message.content, name))
    turns = check_tool_turns(messages)
    return [
        Message(m.role, m.content, m.name, calls, call_id)
        for m, (calls, call_id) in zip(checked, turns, strict=True)
    ]


def _refuse_tool_turns(messages: Sequence[chat_pb2.ChatMessage], model: str) -> None:
    for i, message in enumerate(messages):
        if message.role == "tool" or message.tool_calls:
            field = f"messages[{i}].role" if message.role == "tool" else f"messages[{i}].tool_calls"
            raise InvalidField(
                field, f"needs a model that calls tools; {model!r} does not (see supports_tools)"
            )


def _check_range(
    request: chat_pb2.ChatCompletionRequest,
    field: str,
    default: float,
    low: float,
    high: float,
    low_open: bool,
) -> float:
    if not request.HasField(field):
        return default
    value = float(getattr(request, field))
    above_low = value > low if low_open else value >= low
    if math.isnan(value) or not above_low or value > high:
        bracket = "(" if low_open else "["
        raise InvalidField(field, f"must be in {bracket}{low:g}, {high:g}], got {value:g}")
    return value


def _check_stop(stop: list[str], limits: Limits) -> tuple[str, ...]:
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidField("stop", f"may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}")
    for i, sequence in enumerate(stop):
        if not sequence:
            raise InvalidField(f"stop[{i}]", "must not be empty")
        _check_length(f"stop[{i}]", sequence, limits.max_stop_chars)
    return tuple(stop)


def _check_top_logprobs(request: chat_pb2.ChatCompletionRequest) -> int:
    if not request.HasField("top_logprobs"):
        return 0
    top = request.top_logprobs
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidField("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    if top and not request.logprobs:
        raise InvalidField("top_logprobs", "requires logprobs to be true")
    return top


def _check_response_format(request: chat_pb2.ChatCompletionRequest) -> bool:
    if not request.HasField("response_format"):
        return False
    kind = request.response_format.type
    if kind not in RESPONSE_FORMATS:
        raise InvalidField(
            "response_format.type", f"must be one of {', '.join(RESPONSE_FORMATS)}, got {shown(kind)}"
        )
    return kind != "text"


def _check_json_schema(request: chat_pb2.ChatCompletionRequest) -> str:
    """The schema's JSON text when response_format is json_schema, else ""."""
    if not request.HasField("response_format"):
        return ""
    response_format = request.response_format
    if response_format.type != "json_schema":
        if response_format.HasField("json_schema"):
            raise InvalidField("response_format.json_schema", "is only allowed with type json_schema")
        return ""
    field = "response_format.json_schema.schema"
    if not response_format.HasField("json_schema") or not response_format.json_schema.schema:
        raise InvalidField(field, "is required with type json_schema")
    parse_schema(response_format.json_schema.schema, field)
    return response_format.json_schema.schema
