"""Validation of a request's tools: definitions, tool_choice, and the tool turns of its messages.

Pure, like gateway/validation.py, which calls it. What passes is a ToolUse: the definitions the
chat template shows to the model, and what the worker needs to constrain and parse the reply
(worker/tool_calls.py). Each rule raises InvalidField naming the field, as the reference's 400s do.
"""

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chat.v1 import chat_pb2
from common.models import ToolCallRef
from gateway.errors import InvalidField, shown
from gateway.json_schemas import check_depth, parse_schema

MAX_TOOLS = 128  # as the reference
MAX_TOOL_CALLS = 128  # tool calls in all of a request's messages
# Nesting of a schema or of arguments: deeper JSON would exhaust the recursion of the chat
# template's rendering (and of whoever reads it), and no real tool needs it.
MAX_JSON_DEPTH = 32
# What the chat template writes around each call it renders (brackets, keys, markers), counted
# towards the prompt's characters so that many tiny calls cannot pass for a small prompt.
CALL_OVERHEAD_CHARS = 32
TOOL_CHOICES = ("none", "auto", "required", "function")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolUse:
    """The tools the model is offered, and how it must use them."""

    definitions: tuple[dict[str, Any], ...]  # in the reference's shape, for the chat template
    choice: str  # "auto", "required" or "function" ("none" offers no tools: no ToolUse)
    function_name: str = ""  # with choice "function"
    parallel: bool = True

    @property
    def definitions_json(self) -> str:
        return json.dumps(list(self.definitions), separators=(",", ":"), ensure_ascii=False)


def check_tools(
    request: chat_pb2.ChatCompletionRequest, model_supports_tools: bool, model: str
) -> ToolUse | None:
    """The request's ToolUse; None when it offers no tools or tool_choice is "none"."""
    tools = request.tools
    if not tools:
        if request.HasField("tool_choice"):
            raise InvalidField("tool_choice", "requires tools")
        if request.HasField("parallel_tool_calls"):
            raise InvalidField("parallel_tool_calls", "requires tools")
        return None
    if not model_supports_tools:
        raise InvalidField("tools", f"are not supported by model {model!r}; see ListModels' supports_tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidField("tools", f"may hold at most {MAX_TOOLS} tools, got {len(tools)}")
    definitions = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        definitions.append(_check_tool(tool, f"tools[{i}]", names))
    choice, function_name = _check_tool_choice(request, names)
    if choice == "none":
        return None  # the model is not shown the tools: it replies with text
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    return ToolUse(tuple(definitions), choice, function_name, parallel)


def _check_tool(tool: chat_pb2.Tool, where: str, names: set[str]) -> dict[str, Any]:
    if tool.type != "function":
        raise InvalidField(f"{where}.type", f"must be function, got {shown(tool.type)}")
    function = tool.function
    _check_name(function.name, f"{where}.function.name")
    if function.name in names:
        raise InvalidField(f"{where}.function.name", f"repeats the name {function.name!r} of an earlier tool")
    names.add(function.name)
    definition: dict[str, Any] = {"name": function.name}
    if function.description:
        definition["description"] = function.description
    if function.parameters:
        definition["parameters"] = _check_parameters(function.parameters, f"{where}.function.parameters")
    return {"type": "function", "function": definition}


def _check_name(name: str, field: str) -> None:
    if not _FUNCTION_NAME.fullmatch(name):
        raise InvalidField(field, f"must be 1-64 characters of a-z, A-Z, 0-9, _ and -, got {shown(name)}")


def _check_parameters(text: str, field: str) -> dict[str, Any]:
    schema = parse_schema(text, field, MAX_JSON_DEPTH)
    if schema.get("type", "object") != "object":
        raise InvalidField(
            field, f"must describe an object (type object), got type {shown(str(schema['type']))}"
        )
    return schema


def _check_tool_choice(request: chat_pb2.ChatCompletionRequest, names: set[str]) -> tuple[str, str]:
    if not request.HasField("tool_choice"):
        return "auto", ""
    choice = request.tool_choice
    if choice.mode not in TOOL_CHOICES:
        raise InvalidField(
            "tool_choice", f"must be one of none, auto, required or a function, got {shown(choice.mode)}"
        )
    if choice.mode != "function":
        if choice.function_name:
            raise InvalidField(
                "tool_choice.function.name", "is only allowed when tool_choice names a function"
            )
        return choice.mode, ""
    if choice.function_name not in names:
        raise InvalidField(
            "tool_choice.function.name",
            f"must name one of the request's tools, got {shown(choice.function_name)}",
        )
    return "function", choice.function_name


def check_tool_turns(
    messages: Sequence[chat_pb2.ChatMessage],
) -> list[tuple[tuple[ToolCallRef, ...], str | None]]:
    """Each message's tool calls and tool_call_id, checked: calls only on assistant messages, and
    each tool message answering a call of an earlier assistant message."""
    called: set[str] = set()
    turns: list[tuple[tuple[ToolCallRef, ...], str | None]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        calls = tuple(
            _check_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(message.tool_calls)
        )
        if calls and message.role != "assistant":
            raise InvalidField(
                f"{where}.tool_calls", f"are only allowed on assistant messages, not {message.role}"
            )
        called.update(call.id for call in calls)
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidField(f"{where}.tool_call_id", "is required on a tool message")
            if message.tool_call_id not in called:
                raise InvalidField(
                    f"{where}.tool_call_id",
                    "must answer a tool call of an earlier assistant message,"
                    f" got {shown(message.tool_call_id)}",
                )
            turns.append((calls, message.tool_call_id))
        elif message.tool_call_id:
            raise InvalidField(
                f"{where}.tool_call_id", f"is only allowed on tool messages, not {message.role}"
            )
        else:
            turns.append((calls, None))
    return turns


def _check_call(call: chat_pb2.ToolCall, where: str) -> ToolCallRef:
    if not call.id:
        raise InvalidField(f"{where}.id", "is required")
    if call.type not in ("", "function"):
        raise InvalidField(f"{where}.type", f"must be function, got {shown(call.type)}")
    _check_name(call.function.name, f"{where}.function.name")
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except (ValueError, RecursionError):
        raise InvalidField(f"{where}.function.arguments", "must be JSON text of an object") from None
    if not isinstance(arguments, dict):
        raise InvalidField(
            f"{where}.function.arguments", f"must be a JSON object, got {type(arguments).__name__}"
        )
    check_depth(arguments, f"{where}.function.arguments", MAX_JSON_DEPTH)
    return ToolCallRef(call.id, call.function.name, call.function.arguments or "{}")


def tools_chars(request: chat_pb2.ChatCompletionRequest) -> int:
    """Characters of the request's tool definitions and tool calls, which count towards the prompt;
    raises InvalidField past MAX_TOOL_CALLS (checked before anything is parsed)."""
    calls = [c for m in request.messages for c in m.tool_calls]
    if len(calls) > MAX_TOOL_CALLS:
        raise InvalidField(
            "messages", f"may hold at most {MAX_TOOL_CALLS} tool calls in all, got {len(calls)}"
        )
    definitions = sum(
        len(t.function.name) + len(t.function.description) + len(t.function.parameters) + CALL_OVERHEAD_CHARS
        for t in request.tools
    )
    called = sum(
        len(c.id) + len(c.function.name) + len(c.function.arguments) + CALL_OVERHEAD_CHARS for c in calls
    )
    answers = sum(len(m.tool_call_id) for m in request.messages)
    return definitions + called + answers
