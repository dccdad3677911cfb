"""Replies to requests with tools, read into content and calls (worker/tool_calls.py).

"auto" replies go through vLLM's own xlam parser (worker/engine/vllm.py) with the bundled
model's tokenizer; a VllmEngine that was never started stands in for one that runs, as the
parser needs only the tokenizer.
"""

import json
from types import SimpleNamespace
from typing import cast

import pytest
from transformers import AutoTokenizer

from common.models import ModelSpec
from worker.config import VllmSettings
from worker.engine.base import ToolUse
from worker.engine.vllm import VllmEngine
from worker.tool_calls import InvalidToolCalls, reply_with_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS = json.dumps([WEATHER, {"type": "function", "function": {"name": "get_time"}}])


@pytest.fixture(scope="module")
def engine() -> VllmEngine:
    spec = ModelSpec.parse("SmolLM2-135M-Instruct")
    engine = VllmEngine(spec, VllmSettings(), max_num_seqs=1)
    # Not started: the parts the tool parser reads, as a running engine has them.
    engine._engine = cast(object, SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(str(spec.path))))  # type: ignore[assignment]
    return engine


def test_auto_reads_the_models_calls_with_vllms_parser(engine: VllmEngine) -> None:
    text = '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n]</tool_call>'
    content, calls = reply_with_tools(engine, text, ToolUse(TOOLS, "auto"))
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id


def test_auto_without_a_call_is_text(engine: VllmEngine) -> None:
    assert reply_with_tools(engine, "It is sunny in Paris.", ToolUse(TOOLS, "auto")) == (
        "It is sunny in Paris.",
        [],
    )


def test_required_reads_the_constrained_array(engine: VllmEngine) -> None:
    text = '[{"name":"get_weather","parameters":{"city":"Paris"}},{"name":"get_time","parameters":{}}]'
    content, calls = reply_with_tools(engine, text, ToolUse(TOOLS, "required"))
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_a_named_function_reply_is_its_arguments(engine: VllmEngine) -> None:
    content, calls = reply_with_tools(engine, '{"city":"Paris"}', ToolUse(TOOLS, "function", "get_weather"))
    assert (content, calls[0].name, json.loads(calls[0].arguments)) == ("", "get_weather", {"city": "Paris"})


@pytest.mark.parametrize(
    ("text", "choice", "why"),
    [
        ('{"name":"get_weather"}', "required", "not an array of tool calls"),
        ("[]", "required", "not an array of tool calls"),
        ('[{"name":"get_weather","parameters":1}]', "required", "not a JSON object"),
        ('[{"name":"nope","parameters":{}}]', "required", "'nope', which is not one of the request's tools"),
        ("[1]", "function", "not a JSON object"),
        ('{"city":', "function", "not valid JSON"),
        ('<tool_call>[{"name": "nope", "arguments": {}}]</tool_call>', "auto", "'nope', which is not one of"),
        ('<tool_call>[{"name": "get_weather", "arguments": "hello"}]</tool_call>', "auto", "not valid JSON"),
    ],
)
def test_replies_that_are_not_calls_of_the_tools_are_invalid(
    engine: VllmEngine, text: str, choice: str, why: str
) -> None:
    with pytest.raises(InvalidToolCalls, match=why):
        reply_with_tools(engine, text, ToolUse(TOOLS, choice, "get_weather" if choice == "function" else ""))


def test_an_empty_call_list_is_an_empty_reply_and_without_parallel_calls_one_call_is_kept(
    engine: VllmEngine,
) -> None:
    assert reply_with_tools(engine, "<tool_call>[]</tool_call>", ToolUse(TOOLS, "auto")) == ("", [])
    two = '<tool_call>[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_time", "arguments": {}}]</tool_call>'  # noqa: E501
    _, calls = reply_with_tools(engine, two, ToolUse(TOOLS, "auto", parallel=False))
    assert [c.name for c in calls] == ["get_weather"]
    assert len(reply_with_tools(engine, two, ToolUse(TOOLS, "auto"))[1]) == 2


def test_the_schemas_are_vllms(engine: VllmEngine) -> None:
    required = json.loads(engine.tool_call_schema(ToolUse(TOOLS, "required", parallel=False)))
    assert required["type"] == "array" and required["minItems"] == 1 and required["maxItems"] == 1
    assert "maxItems" not in json.loads(engine.tool_call_schema(ToolUse(TOOLS, "required")))
    named = json.loads(engine.tool_call_schema(ToolUse(TOOLS, "function", "get_weather")))
    assert named == WEATHER["function"]["parameters"]  # type: ignore[index]
    # A function without parameters still takes an object.
    assert json.loads(engine.tool_call_schema(ToolUse(TOOLS, "function", "get_time")))["type"] == "object"
