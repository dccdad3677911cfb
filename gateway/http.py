"""The Groq/OpenAI-compatible HTTP API: an adapter over gateway/relay.py.

The one module that owns the HTTP/JSON wire format: request bodies become chat.v1
requests (then validated like gRPC ones), relay items become JSON responses or SSE
chunks, and errors become `{"error": {"message", "type", "param", "code"}}` with the
status from errors.STATUSES. Code written against the groq SDK (`GROQ_BASE_URL`, path
/openai/v1) or the openai SDK (`OPENAI_BASE_URL`, path /v1) runs unchanged.

aiohttp serves it on the gateway's event loop, beside grpc.aio. With handler
cancellation on, a caller that disconnects cancels its handler, which closes the
relay, as on gRPC: the job is cancelled, or for a stream left running for the resume
grace (GET /chat/completions/{id}?stream=true&starting_after=N picks it up).
"""

import asyncio
import json
import logging
import math
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from chat.v1 import chat_pb2
from common import codec, tracing
from gateway.access import Metadata, ModelDirectory
from gateway.auth import Authenticator
from gateway.catalog import ServedModel
from gateway.config import GatewaySettings
from gateway.errors import (
    InvalidField,
    JsonValidateFailed,
    MalformedRequest,
    Overloaded,
    RequestTooLarge,
    ServiceError,
    UnsupportedParameter,
)
from gateway.idempotency import METADATA_KEY as IDEMPOTENCY_METADATA
from gateway.relay import Accepted, Caller, Failed, Finished, Relay, Started, Text, Usage
from gateway.resume import ChoiceReply

log = logging.getLogger(__name__)

PREFIXES = ("/openai/v1", "/v1")  # the groq SDK's base path, the openai SDK's
_INT32 = (1 << 31) - 1
_INT64 = 1 << 63
# Parameters of the dialect this service does not implement: set to anything but null they
# are refused, naming the parameter, never silently ignored.
_UNSUPPORTED = (
    "functions", "function_call", "logit_bias",
    "reasoning_effort", "reasoning_format", "include_reasoning",
    "metadata", "store", "modalities", "audio", "prediction", "search_settings", "documents",
    "web_search_options", "citation_options", "compound_custom", "exclude_domains", "include_domains",
)  # fmt: skip
_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")


@dataclass
class Options:
    """What the HTTP body asks beyond the chat.v1 request."""

    stream: bool = False
    include_usage: bool = False
    renamed: dict[str, str] = field(default_factory=dict)  # chat.v1 field -> the body's name for it


def parse_request(body: object) -> tuple[chat_pb2.ChatCompletionRequest, Options]:
    """A chat-completions body as a chat.v1 request; raises InvalidField for what cannot map."""
    if not isinstance(body, dict):
        raise MalformedRequest("the request body must be a JSON object")
    options = Options()
    request = chat_pb2.ChatCompletionRequest()
    body = {k: v for k, v in body.items() if v is not None}  # null means "not set", as the SDKs send it
    request.model = _typed(body.pop("model", ""), "model", str)
    request.messages.extend(_messages(body.pop("messages", [])))
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        if name in body:
            setattr(request, name, _number(body.pop(name), name))
    _set_max_tokens(request, body, options)
    if "seed" in body:
        request.seed = _integer(body.pop("seed"), "seed", -_INT64, _INT64 - 1)
    if "n" in body:
        request.n = _integer(body.pop("n"), "n", -_INT32 - 1, _INT32)
    if "logprobs" in body:
        request.logprobs = _typed(body.pop("logprobs"), "logprobs", bool)
    if "top_logprobs" in body:
        request.top_logprobs = _integer(body.pop("top_logprobs"), "top_logprobs", -_INT32 - 1, _INT32)
    if "stop" in body:
        stop = body.pop("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidField("stop", "must be a string or a list of strings")
        request.stop.extend(stop)
    if "response_format" in body:
        _set_response_format(request, _typed(body.pop("response_format"), "response_format", dict))
    request.user = _typed(body.pop("user", ""), "user", str)
    request.prompt_cache_key = _typed(body.pop("prompt_cache_key", ""), "prompt_cache_key", str)
    if "service_tier" in body:
        request.service_tier = _typed(body.pop("service_tier"), "service_tier", str)
    if "tools" in body:
        request.tools.extend(_tools(body.pop("tools")))
    if "tool_choice" in body:
        request.tool_choice.CopyFrom(_tool_choice(body.pop("tool_choice")))
    if "parallel_tool_calls" in body:
        request.parallel_tool_calls = _typed(body.pop("parallel_tool_calls"), "parallel_tool_calls", bool)
    options.stream = _typed(body.pop("stream", False), "stream", bool)
    if "stream_options" in body:
        stream_options = _typed(body.pop("stream_options"), "stream_options", dict)
        if not options.stream:
            raise InvalidField("stream_options", "is only allowed when stream is true")
        options.include_usage = _typed(
            stream_options.pop("include_usage", False), "stream_options.include_usage", bool
        )
        _refuse_rest(stream_options, "stream_options.")
    _refuse_rest(body, "")
    return request, options


def _refuse_rest(body: dict[str, Any], prefix: str) -> None:
    for name in body:
        if name in _UNSUPPORTED:
            raise UnsupportedParameter(prefix + name)
        raise UnsupportedParameter(prefix + name, "is not a known parameter")


def _typed(value: Any, name: str, kind: type) -> Any:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidField(name, f"must be of type {_JSON_TYPES[kind]}, got {_json_type(value)}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidField(name, f"must be a number, got {_json_type(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer literal with hundreds of digits
        raise InvalidField(name, "must be a number of a sensible size") from None


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(name, f"must be an integer, got {_json_type(value)}")
    if not low <= value <= high:
        raise InvalidField(name, f"must be between {low} and {high}, got {value}")
    return value


_JSON_TYPES = {str: "string", bool: "boolean", list: "array", dict: "object"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _messages(messages: Any) -> list[chat_pb2.ChatMessage]:
    parsed = []
    for i, message in enumerate(_typed(messages, "messages", list)):
        where = f"messages[{i}]"
        message = {k: v for k, v in _typed(message, where, dict).items() if v is not None}
        for name in message:
            if name not in _MESSAGE_FIELDS:
                raise UnsupportedParameter(f"{where}.{name}")
        item = chat_pb2.ChatMessage(
            role=_typed(message.get("role", ""), f"{where}.role", str),
            content=_content(message.get("content", ""), f"{where}.content"),
        )
        if "name" in message:
            item.name = _typed(message["name"], f"{where}.name", str)
        for j, call in enumerate(_typed(message.get("tool_calls", []), f"{where}.tool_calls", list)):
            item.tool_calls.append(_tool_call(call, f"{where}.tool_calls[{j}]"))
        item.tool_call_id = _typed(message.get("tool_call_id", ""), f"{where}.tool_call_id", str)
        parsed.append(item)
    return parsed


def _tool_call(call: Any, where: str) -> chat_pb2.ToolCall:
    call = _typed(call, where, dict)
    function = _typed(call.get("function", {}), f"{where}.function", dict)
    return chat_pb2.ToolCall(
        id=_typed(call.get("id", ""), f"{where}.id", str),
        type=_typed(call.get("type", "function"), f"{where}.type", str),
        function=chat_pb2.FunctionCall(
            name=_typed(function.get("name", ""), f"{where}.function.name", str),
            arguments=_typed(function.get("arguments", ""), f"{where}.function.arguments", str),
        ),
    )


def _tools(tools: Any) -> list[chat_pb2.Tool]:
    parsed = []
    for i, tool in enumerate(_typed(tools, "tools", list)):
        where = f"tools[{i}]"
        tool = _typed(tool, where, dict)
        function = {
            k: v
            for k, v in _typed(tool.get("function", {}), f"{where}.function", dict).items()
            if v is not None
        }
        for name in function:
            if name not in ("name", "description", "parameters", "strict"):
                raise UnsupportedParameter(f"{where}.function.{name}", "is not a known field of a function")
        definition = chat_pb2.FunctionDefinition(
            name=_typed(function.get("name", ""), f"{where}.function.name", str),
            description=_typed(function.get("description", ""), f"{where}.function.description", str),
        )
        if "parameters" in function:
            parameters = _typed(function["parameters"], f"{where}.function.parameters", dict)
            definition.parameters = json.dumps(parameters, ensure_ascii=False)
        if "strict" in function:
            definition.strict = _typed(function["strict"], f"{where}.function.strict", bool)
        parsed.append(
            chat_pb2.Tool(type=_typed(tool.get("type", ""), f"{where}.type", str), function=definition)
        )
    return parsed


def _tool_choice(choice: Any) -> chat_pb2.ToolChoice:
    """ "none", "auto", "required", or {"type": "function", "function": {"name": ...}}."""
    if isinstance(choice, str):
        return chat_pb2.ToolChoice(mode=choice)
    choice = _typed(choice, "tool_choice", dict)
    if choice.get("type") != "function":
        raise InvalidField("tool_choice.type", f"must be function, got {json.dumps(choice.get('type'))[:64]}")
    function = _typed(choice.get("function"), "tool_choice.function", dict)
    name = _typed(function.get("name", ""), "tool_choice.function.name", str)
    return chat_pb2.ToolChoice(mode="function", function_name=name)


def _content(content: Any, where: str) -> str:
    """A string, or a list of text parts (joined); other parts (images, audio) are refused."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(_typed(content, where, list)):
        part = _typed(part, f"{where}[{j}]", dict)
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise UnsupportedParameter(f"{where}[{j}].type", "must be text: only text content is supported")
        texts.append(part["text"])
    return "".join(texts)


def _set_max_tokens(request: chat_pb2.ChatCompletionRequest, body: dict[str, Any], options: Options) -> None:
    # max_completion_tokens is the current name; max_tokens the older alias.
    new, old = body.pop("max_completion_tokens", None), body.pop("max_tokens", None)
    if new is not None and old is not None and new != old:
        raise InvalidField("max_completion_tokens", "and max_tokens (its older alias) differ")
    if new is not None:
        options.renamed["max_tokens"] = "max_completion_tokens"
    value = new if new is not None else old
    if value is not None:
        request.max_tokens = _integer(value, options.renamed.get("max_tokens", "max_tokens"), -_INT32, _INT32)


def _set_response_format(request: chat_pb2.ChatCompletionRequest, response_format: dict[str, Any]) -> None:
    response_format = dict(response_format)
    request.response_format.type = _typed(response_format.pop("type", ""), "response_format.type", str)
    schema = response_format.pop("json_schema", None)
    _refuse_rest(response_format, "response_format.")
    if schema is None:
        return
    schema = dict(_typed(schema, "response_format.json_schema", dict))
    target = request.response_format.json_schema
    target.name = _typed(schema.pop("name", ""), "response_format.json_schema.name", str)
    target.description = _typed(schema.pop("description", ""), "response_format.json_schema.description", str)
    if "schema" in schema:
        target.schema = json.dumps(schema.pop("schema"))  # validation checks it is an object
    if schema.get("strict") is not None:
        target.strict = _typed(schema.pop("strict"), "response_format.json_schema.strict", bool)
    schema.pop("strict", None)
    _refuse_rest(schema, "response_format.json_schema.")


# ---- responses ----


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "queue_time": usage.queue_time,
        "prompt_tokens": usage.prompt_tokens,
        "prompt_time": usage.prompt_time,
        "completion_tokens": usage.completion_tokens,
        "completion_time": usage.completion_time,
        "total_tokens": usage.total_tokens,
        "total_time": usage.total_time,
    }


def _completion(
    call: Accepted, replies: dict[int, ChoiceReply], finished: Finished | None, fingerprint: str = ""
) -> dict[str, Any]:
    """The completion; without `finished`, as far as it has come (finish_reason and usage null)."""
    choices = []
    for index in range(call.choices):
        reply = replies.get(index, ChoiceReply())
        choices.append(
            {
                "index": index,
                "message": _message(reply),
                "logprobs": _logprobs(reply.logprobs),
                "finish_reason": finished.finish_reason_of(index) if finished is not None else None,
            }
        )
    return {
        "id": call.completion_id,
        "object": "chat.completion",
        "created": call.created,
        "model": call.model,
        "choices": choices,
        "usage": _usage(finished.usage) if finished is not None else None,
        "system_fingerprint": finished.system_fingerprint if finished is not None else fingerprint,
        "service_tier": call.service_tier,
        "x_groq": {"id": f"req_{call.request_id}"},
    }


def _message(reply: ChoiceReply) -> dict[str, Any]:
    """The reference's assistant message: content null when the reply is only tool calls."""
    if not reply.tool_calls:
        return {"role": "assistant", "content": reply.text}
    return {"role": "assistant", "content": reply.text or None, "tool_calls": _tool_calls(reply.tool_calls)}


def _tool_calls(calls: Sequence[codec.ToolCall], indexed: bool = False) -> list[dict[str, Any]]:
    """Tool calls in the reference's shape; indexed: as a stream's delta.tool_calls."""
    return [
        {
            **({"index": i} if indexed else {}),
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(calls)
    ]


def _chunk(call: Accepted, fingerprint: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": call.completion_id,
        "object": "chat.completion.chunk",
        "created": call.created,
        "model": call.model,
        "system_fingerprint": fingerprint,
        "service_tier": call.service_tier,
        "choices": choices,
    }


def _chunk_choice(
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: Sequence[codec.TokenLogprob] = (),
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": _logprobs(logprobs), "finish_reason": finish_reason}


def _logprobs(entries: Sequence[codec.TokenLogprob]) -> dict[str, Any] | None:
    """The reference's `logprobs` object; null where they were not asked for."""
    if not entries:
        return None
    return {"content": [_token_logprob(entry) for entry in entries], "refusal": None}


def _token_logprob(entry: codec.TokenLogprob, top: bool = False) -> dict[str, Any]:
    """A generated token's entry; top: one of its top_logprobs, which have none of their own."""
    token = {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode())}
    if top:
        return token
    return {**token, "top_logprobs": [_token_logprob(t, top=True) for t in entry.top_logprobs]}


def _error_body(error: ServiceError, options: Options | None = None) -> dict[str, Any]:
    param = getattr(error, "field", None)
    message = error.message
    if options is not None and param in options.renamed:
        message = message.replace(f"`{param}`", f"`{options.renamed[param]}`")
        param = options.renamed[param]
    body: dict[str, Any] = {
        "message": message,
        "type": error.status.type,
        "param": param,
        "code": error.status.code,
    }
    if isinstance(error, JsonValidateFailed):
        body["failed_generation"] = error.failed_generation
    return {"error": body}


def _error_headers(error: ServiceError) -> dict[str, str]:
    headers = dict(error.metadata)  # x-ratelimit-* of a RateLimited error
    retry = error.status.retryable
    if isinstance(error, Overloaded):
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after_seconds)))
        headers["retry-after-ms"] = str(int(error.retry_after_seconds * 1000))
    # The SDKs retry 409, 429 and 5xx on their own; tell them when that cannot help.
    headers["x-should-retry"] = "true" if retry else "false"
    return headers


def error_response(error: ServiceError, options: Options | None = None) -> web.Response:
    if error.status.http >= 500 and not error.status.retryable:
        log.error("HTTP %d: %s", error.status.http, error.message)
    return web.json_response(
        _error_body(error, options), status=error.status.http, headers=_error_headers(error)
    )


def _sse(payload: object, seq: int | None = None) -> bytes:
    """One server-sent event; with seq, its `id`, which a resume names (starting_after, Last-Event-ID)."""
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    return data if seq is None else b"id: %d\n" % seq + data


# Sent while a stream waits in silence (a queue wait, a long prefill), so that proxies and load
# balancers with an idle timeout keep the connection; an SSE comment, which clients ignore.
_KEEPALIVE = b": keepalive\n\n"


# ---- handlers ----


class HttpApi:
    """Routes, handlers and the aiohttp server of the HTTP API."""

    def __init__(
        self,
        settings: GatewaySettings,
        relay: Relay,
        directory: ModelDirectory,
        authenticator: Authenticator | None,
        is_ready: Callable[[str | None], bool],  # the gateway, or with a model name that model
    ) -> None:
        self._settings = settings
        self._relay = relay
        self._directory = directory
        self._authenticator = authenticator  # None: GATEWAY_AUTH=off
        self._is_ready = is_ready
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._settings.max_request_bytes, middlewares=[_errors_as_json])
        for prefix in PREFIXES:
            app.router.add_post(f"{prefix}/chat/completions", self.chat_completions)
            app.router.add_get(f"{prefix}/chat/completions/{{completion_id}}", self.get_completion)
            app.router.add_get(f"{prefix}/models", self.list_models)
            app.router.add_get(f"{prefix}/models/{{model:.+}}", self.get_model)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    async def start(self) -> None:
        # handler_cancellation: a disconnect cancels the handler, so the job is cancelled at once.
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self._settings.shutdown_grace_seconds,
        )
        await self._runner.setup()
        host, port = self._settings.http_host_port
        site = web.TCPSite(self._runner, host, port, ssl_context=_ssl_context(self._settings))
        await site.start()
        self.port = self._runner.addresses[0][1] if self._runner.addresses else port

    async def stop(self) -> None:
        """Stops listening, then lets open requests finish within the shutdown grace period."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        parsed: chat_pb2.ChatCompletionRequest | ServiceError
        options = Options()
        metadata = _metadata(request)
        try:
            # The key before the body: who has no valid key costs no read or parse of up to
            # GATEWAY_MAX_REQUEST_BYTES (the relay checks the key again, from its cache).
            if self._authenticator is not None:
                await self._authenticator.authenticate(metadata, None)
            parsed, options = parse_request(await _json_body(request, self._settings.max_request_bytes))
        except ServiceError as exc:
            parsed = exc  # refused by the relay, so it counts in the same metrics
        idempotency = (IDEMPOTENCY_METADATA, request.headers.get("Idempotency-Key", ""))
        caller = Caller((*metadata, idempotency), None, "http")
        items = self._relay.run(parsed, caller, stream=options.stream)
        async with aclosing(items):
            if options.stream:
                return await _stream(request, items, options, self._settings.sse_keepalive_seconds)
            return await _unary(items, options)

    async def get_completion(self, request: web.Request) -> web.StreamResponse:
        """A completion by id: `?stream=true` streams it again after `starting_after` (or the
        Last-Event-ID header) and on to its end; else it is returned as far as it has come."""
        completion_id = request.match_info["completion_id"]
        caller = Caller(_metadata(request), None, "http")
        stream = _query_flag(request, "stream")
        cursor = request.query.get("starting_after", request.headers.get("Last-Event-ID", ""))
        try:
            after = int(cursor) if cursor else -1
        except ValueError:
            return error_response(InvalidField("starting_after", f"must be an integer, got {cursor!r}"))
        items = self._relay.resume(completion_id, caller, after, follow=stream)
        async with aclosing(items):
            if stream:
                options = Options(stream=True, include_usage=_query_flag(request, "include_usage"))
                return await _stream(request, items, options, self._settings.sse_keepalive_seconds)
            return await _unary(items, Options(), whole=False)

    async def list_models(self, request: web.Request) -> web.Response:
        """The models the caller's key may use (a ServiceError answers through _errors_as_json)."""
        models = await self._directory.visible(_metadata(request))
        return web.json_response({"object": "list", "data": [_model(m.name, m) for m in models]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        return web.json_response(_model(name, await self._directory.get(_metadata(request), name)))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready while the gRPC health says SERVING: Redis answers and the gateway is not stopping.
        `/readyz?model=NAME` as `chat.v1.ChatService/NAME`: also a live worker serves the model."""
        ready = self._is_ready(request.query.get("model"))
        return web.json_response({"status": "ok" if ready else "not ready"}, status=200 if ready else 503)


def _metadata(request: web.Request) -> Metadata:
    # traceparent/tracestate too: the relay traces the call under the caller's span.
    authorization = ("authorization", request.headers.get("Authorization", ""))
    return (authorization, *tracing.trace_headers(request.headers))


def _model(name: str, served: ServedModel) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": served.created,
        "owned_by": "chat-service",
        "active": True,
        "context_window": served.context_window,
        "supports_tools": served.supports_tools,
    }


async def _json_body(request: web.Request, limit: int) -> object:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLarge(f"the request body is larger than the limit of {limit} bytes") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest(f"the request body is not valid JSON: {exc}") from None


def _query_flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false"):
        raise InvalidField(name, f"must be true or false, got {value!r}")
    return value == "true"


async def _unary(items: AsyncIterator[Any], options: Options, whole: bool = True) -> web.Response:
    """One JSON completion. whole: the job must finish; else what came so far will do (GET by id)."""
    call: Accepted | None = None
    replies: dict[int, ChoiceReply] = {}
    fingerprint = ""
    async for item in items:
        if isinstance(item, Accepted):
            call = item
        elif isinstance(item, Started):
            fingerprint = item.system_fingerprint
        elif isinstance(item, Text):
            replies.setdefault(item.index, ChoiceReply()).add(item.text, item.logprobs, item.tool_calls)
        elif isinstance(item, Failed):
            return error_response(item.error, options)
        elif isinstance(item, Finished) and call is not None:
            headers = {**dict(call.ratelimit), "x-request-id": f"req_{call.request_id}"}
            return web.json_response(_completion(call, replies, item), headers=headers)
    if call is not None and not whole:
        so_far = _completion(call, replies, None, fingerprint)
        return web.json_response(so_far, headers={"x-request-id": f"req_{call.request_id}"})
    return error_response(ServiceError("the job ended without a result"))


async def _stream(
    request: web.Request, items: AsyncIterator[Any], options: Options, keepalive_seconds: float
) -> web.StreamResponse:
    """Server-sent events: a role chunk, text chunks, the chunk with finish_reason, [DONE]. Each
    chunk has an `id` to resume after; silent waits send a keepalive comment."""
    # aclosing: a write that fails mid-keepalive must still close the wrapper (and the call).
    async with aclosing(_with_keepalives(items, keepalive_seconds)) as paced:
        return await _write_stream(request, paced, options)


async def _write_stream(
    request: web.Request, items: AsyncIterator[Any], options: Options
) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    call: Accepted | None = None
    fingerprint = ""
    async for item in items:
        if item is None:
            if response is not None:
                await response.write(_KEEPALIVE)
            continue
        if isinstance(item, Failed):
            if response is None:
                return error_response(item.error, options)
            await response.write(_sse(_error_body(item.error, options)))  # the SDKs raise it
            return response
        if isinstance(item, Accepted):
            call = item
            headers = {**dict(call.ratelimit), "x-request-id": f"req_{call.request_id}"}
            response = web.StreamResponse(headers={**headers, "Cache-Control": "no-cache"})
            response.content_type = "text/event-stream"
            await response.prepare(request)
        elif response is None or call is None:
            break
        elif isinstance(item, Started):
            fingerprint = item.system_fingerprint
            if item.replayed:
                continue
            role = [_chunk_choice(i, {"role": "assistant", "content": ""}) for i in range(call.choices)]
            first = _chunk(call, fingerprint, role)
            first["x_groq"] = {"id": f"req_{call.request_id}"}
            await response.write(_sse(first, item.seq))
        elif isinstance(item, Text):
            delta: dict[str, Any] = {"content": item.text}
            if item.tool_calls:
                delta = {
                    "content": item.text or None,
                    "tool_calls": _tool_calls(item.tool_calls, indexed=True),
                }
            text = _chunk_choice(item.index, delta, logprobs=item.logprobs)
            await response.write(_sse(_chunk(call, fingerprint, [text]), item.seq))
        elif isinstance(item, Finished) and item.replayed:
            await response.write(b"data: [DONE]\n\n")  # a resume after the last chunk: nothing left
            await response.write_eof()
            return response
        elif isinstance(item, Finished):
            fingerprint = item.system_fingerprint  # a resume that skipped the role chunk has it here
            last = _chunk(
                call,
                fingerprint,
                [_chunk_choice(i, {}, item.finish_reason_of(i)) for i in range(call.choices)],
            )
            last["x_groq"] = {"id": f"req_{call.request_id}", "usage": _usage(item.usage)}
            await response.write(_sse(last, item.seq))
            if options.include_usage:
                usage_chunk = {**_chunk(call, fingerprint, []), "usage": _usage(item.usage)}
                await response.write(_sse(usage_chunk))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
    if response is None:
        return error_response(ServiceError("the job ended without a result"))
    return response


async def _with_keepalives(items: AsyncIterator[Any], seconds: float) -> AsyncGenerator[Any]:
    """The items, with None after every `seconds` of silence between them. The pending item is
    awaited across the silences, never cancelled: cancelling it would end the call."""
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending}, timeout=seconds)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)


@web.middleware
async def _errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Routing errors and bugs answer in the API's error shape too; nothing crashes the process."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = {
            "error": {"message": exc.reason, "type": "invalid_request_error", "param": None, "code": None}
        }
        if exc.status == 404:
            body["error"]["code"] = "unknown_url"
            body["error"]["message"] = f"unknown URL: {request.method} {request.path}"
        return web.json_response(body, status=exc.status, headers={"x-should-retry": "false"})
    except ServiceError as exc:
        return error_response(exc)
    except ConnectionResetError:
        # The client left mid-stream (its job is cancelled as the call's items close): there is
        # nobody to answer, and aiohttp ends such a request quietly.
        raise
    except Exception:
        log.exception("HTTP handler failed on %s %s", request.method, request.path)
        return error_response(ServiceError("internal error in the gateway"))


def _ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The gRPC port's TLS settings: the same certificate, and mTLS when a client CA is set."""
    if not settings.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file:
        context.load_verify_locations(settings.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
