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
from worker.engine.base import EngineRejected, ToolUse
from worker.engine.vllm import VllmEngine
from worker.tool_calls import reply_with_tools

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


def test_replies_that_are_not_calls_are_rejected(engine: VllmEngine) -> None:
    with pytest.raises(EngineRejected):
        reply_with_tools(engine, '{"name":"get_weather"}', ToolUse(TOOLS, "required"))
    with pytest.raises(EngineRejected):
        reply_with_tools(engine, "[1]", ToolUse(TOOLS, "function", "get_weather"))


def test_the_schemas_are_vllms(engine: VllmEngine) -> None:
    required = json.loads(engine.tool_call_schema(ToolUse(TOOLS, "required", parallel=False)))
    assert required["type"] == "array" and required["minItems"] == 1 and required["maxItems"] == 1
    assert "maxItems" not in json.loads(engine.tool_call_schema(ToolUse(TOOLS, "required")))
    named = json.loads(engine.tool_call_schema(ToolUse(TOOLS, "function", "get_weather")))
    assert named == WEATHER["function"]["parameters"]  # type: ignore[index]
    # A function without parameters still takes an object.
    assert json.loads(engine.tool_call_schema(ToolUse(TOOLS, "function", "get_time")))["type"] == "object"
