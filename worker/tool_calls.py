"""A whole reply to a request with tools, turned into its content and tool calls.

With tool_choice "required" or a named function, decoding followed the schema of the engine's
tool_call_schema(), so the reply is JSON that this module reads as vLLM's server does: an array
of {"name", "parameters"}, or the named function's arguments. With "auto" the reply is in the
model's own format, which only the engine's tool parser knows; a reply without a call is text.
"""

import json
import secrets

from worker.engine.base import Engine, EngineRejected, ToolCall, ToolUse


def reply_with_tools(engine: Engine, text: str, tools: ToolUse) -> tuple[str, list[ToolCall]]:
    """(content, tool calls) of a finished reply; raises EngineRejected for one that cannot be read."""
    if tools.choice == "auto":
        return engine.extract_tool_calls(text, tools)
    if tools.choice == "function":
        return "", [ToolCall(new_call_id(), tools.function_name, _object_text(json.loads(text)))]
    calls = json.loads(text)
    if not isinstance(calls, list):
        raise EngineRejected("the reply is not an array of tool calls")
    return "", [
        ToolCall(new_call_id(), str(call["name"]), _object_text(call["parameters"])) for call in calls
    ]


def new_call_id() -> str:
    """An id for a call the model made, unique enough to answer it by (as the reference's)."""
    return f"call_{secrets.token_hex(12)}"


def _object_text(arguments: object) -> str:
    if not isinstance(arguments, dict):
        raise EngineRejected("a tool call's arguments are not a JSON object")
    return json.dumps(arguments, ensure_ascii=False)
