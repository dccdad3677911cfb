"""A whole reply to a request with tools, turned into its content and tool calls.

With tool_choice "required" or a named function, decoding followed the schema of the engine's
tool_call_schema(), so the reply is JSON that this module reads as vLLM's server does: an array
of {"name", "parameters"}, or the named function's arguments. With "auto" the reply is in the
model's own format, which only the engine's tool parser knows; a reply without a call is text.
Calls are checked either way: each names one of the request's tools and has a JSON object for
arguments, and without parallel calls there is one.
"""

import json
import secrets

from worker.engine.base import Engine, ToolCall, ToolUse


class InvalidToolCalls(ValueError):
    """The model's reply is not valid calls of the request's tools (the caller's tool_use_failed)."""


def reply_with_tools(engine: Engine, text: str, tools: ToolUse) -> tuple[str, list[ToolCall]]:
    """(content, tool calls) of a finished reply. Raises InvalidToolCalls for a reply that does not
    call the tools as it must, EngineRejected when the engine cannot read tool calls at all."""
    if tools.choice == "auto":
        content, calls = engine.extract_tool_calls(text, tools)
    elif tools.choice == "function":
        content, calls = "", [ToolCall(new_call_id(), tools.function_name, _object_text(_json(text)))]
    else:
        array = _json(text)
        if not isinstance(array, list) or not array or not all(isinstance(c, dict) for c in array):
            raise InvalidToolCalls("the reply is not an array of tool calls")
        calls = [
            ToolCall(new_call_id(), str(c.get("name")), _object_text(c.get("parameters"))) for c in array
        ]
        content = ""
    _check(calls, tools)
    if not tools.parallel:
        calls = calls[:1]  # parallel_tool_calls false: one call, as the caller asked
    return content, calls


def new_call_id() -> str:
    """An id for a call the model made, unique enough to answer it by (as the reference's)."""
    return f"call_{secrets.token_hex(12)}"


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidToolCalls("the reply is not valid JSON") from None


def _object_text(arguments: object) -> str:
    if not isinstance(arguments, dict):
        raise InvalidToolCalls("a call's arguments are not a JSON object")
    return json.dumps(arguments, ensure_ascii=False)


def _check(calls: list[ToolCall], tools: ToolUse) -> None:
    names = {tool["function"]["name"] for tool in json.loads(tools.definitions)}
    for call in calls:
        if call.name not in names:
            raise InvalidToolCalls(
                f"the reply calls {call.name[:64]!r}, which is not one of the request's tools"
            )
        try:
            arguments = json.loads(call.arguments)
        except (ValueError, RecursionError):
            raise InvalidToolCalls(f"the arguments of the call of {call.name!r} are not valid JSON") from None
        if not isinstance(arguments, dict):
            raise InvalidToolCalls(f"the arguments of the call of {call.name!r} are not a JSON object")
