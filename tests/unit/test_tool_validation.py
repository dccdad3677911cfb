"""Validation of tools, tool_choice and tool turns (gateway/tools.py), one case per rule."""

import json

import pytest

from chat.v1 import chat_pb2
from common.models import ModelSpec, ToolCallRef
from gateway.catalog import ModelCatalog
from gateway.errors import InvalidField
from gateway.validation import validate
from tests.integration.stack import chat_request

MODEL = "SmolLM2-135M-Instruct"
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    return ModelCatalog.load((ModelSpec.parse(MODEL),))


def tool(name: str = "get_weather", parameters: object = PARAMETERS, kind: str = "function") -> chat_pb2.Tool:
    text = parameters if isinstance(parameters, str) else json.dumps(parameters)
    return chat_pb2.Tool(type=kind, function=chat_pb2.FunctionDefinition(name=name, parameters=text))


def with_tools(*tools: chat_pb2.Tool, **fields: object) -> chat_pb2.ChatCompletionRequest:
    request = chat_request("Weather in Paris?", **fields)
    request.tools.extend(tools)
    return request


def call(call_id: str = "call_1", arguments: str = '{"city": "Paris"}') -> chat_pb2.ToolCall:
    return chat_pb2.ToolCall(
        id=call_id, type="function", function=chat_pb2.FunctionCall(name="get_weather", arguments=arguments)
    )


def test_tools_default_to_auto_and_parallel_and_are_rendered(catalog: ModelCatalog) -> None:
    plain = validate(chat_request("Weather in Paris?"), catalog, 16)
    valid = validate(with_tools(tool()), catalog, 16)
    assert valid.tools is not None and valid.tools.choice == "auto" and valid.tools.parallel
    assert json.loads(valid.tools.definitions_json) == [
        {"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}
    ]
    assert len(valid.prompt_token_ids) > len(plain.prompt_token_ids) + 50  # the tools are in the prompt


def test_tool_choice_none_shows_the_model_no_tools(catalog: ModelCatalog) -> None:
    request = with_tools(tool())
    request.tool_choice.mode = "none"
    valid = validate(request, catalog, 16)
    assert valid.tools is None
    assert valid.prompt_token_ids == validate(chat_request("Weather in Paris?"), catalog, 16).prompt_token_ids


def test_a_named_function_and_parallel_false_are_carried(catalog: ModelCatalog) -> None:
    request = with_tools(tool(), tool("get_time", {"type": "object"}), parallel_tool_calls=False)
    request.tool_choice.mode, request.tool_choice.function_name = "function", "get_time"
    valid = validate(request, catalog, 16)
    assert valid.tools is not None
    assert (valid.tools.choice, valid.tools.function_name, valid.tools.parallel) == (
        "function",
        "get_time",
        False,
    )


def refused(catalog: ModelCatalog, request: chat_pb2.ChatCompletionRequest) -> InvalidField:
    with pytest.raises(InvalidField) as caught:
        validate(request, catalog, 16)
    return caught.value


@pytest.mark.parametrize(
    ("tools", "field", "words"),
    [
        ([tool(kind="retrieval")], "tools[0].type", "must be function"),
        ([tool(name="")], "tools[0].function.name", "1-64 characters"),
        ([tool(name="get weather")], "tools[0].function.name", "1-64 characters"),
        ([tool(name="x" * 65)], "tools[0].function.name", "1-64 characters"),
        ([tool(), tool()], "tools[1].function.name", "repeats the name"),
        ([tool(parameters="{not json")], "tools[0].function.parameters", "valid JSON"),
        ([tool(parameters=[1])], "tools[0].function.parameters", "JSON Schema object"),
        ([tool(parameters={"type": 5})], "tools[0].function.parameters", "not a valid JSON Schema"),
        ([tool(parameters={"type": "string"})], "tools[0].function.parameters", "must describe an object"),
        ([tool(f"f{i}") for i in range(129)], "tools", "at most 128"),
    ],
)
def test_malformed_tools_are_refused_naming_the_field(
    catalog: ModelCatalog, tools: list[chat_pb2.Tool], field: str, words: str
) -> None:
    error = refused(catalog, with_tools(*tools))
    assert error.field == field and words in str(error)


def test_tool_choice_rules(catalog: ModelCatalog) -> None:
    request = chat_request("hi")
    request.tool_choice.mode = "auto"
    assert refused(catalog, request).field == "tool_choice"  # requires tools
    assert refused(catalog, chat_request("hi", parallel_tool_calls=True)).field == "parallel_tool_calls"
    request = with_tools(tool())
    request.tool_choice.mode = "sometimes"
    assert refused(catalog, request).field == "tool_choice"
    request.tool_choice.mode, request.tool_choice.function_name = "function", "get_time"
    error = refused(catalog, request)
    assert error.field == "tool_choice.function.name" and "get_time" in str(error)
    request = with_tools(tool(), response_format="json_object")
    assert refused(catalog, request).field == "response_format"


def conversation(*messages: chat_pb2.ChatMessage) -> chat_pb2.ChatCompletionRequest:
    request = with_tools(tool())
    request.messages.extend(messages)
    return request


def test_a_tool_round_trip_conversation_is_valid(catalog: ModelCatalog) -> None:
    valid = validate(
        conversation(
            chat_pb2.ChatMessage(role="assistant", tool_calls=[call()]),
            chat_pb2.ChatMessage(role="tool", content="22 C", tool_call_id="call_1"),
        ),
        catalog,
        16,
    )
    assert valid.tools is not None


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([chat_pb2.ChatMessage(role="tool", content="22 C")], "messages[1].tool_call_id"),
        ([chat_pb2.ChatMessage(role="tool", content="22 C", tool_call_id="call_9")], "messages[1].tool_call_id"),  # noqa: E501
        ([chat_pb2.ChatMessage(role="user", content="x", tool_call_id="call_1")], "messages[1].tool_call_id"),
        ([chat_pb2.ChatMessage(role="user", content="x", tool_calls=[call()])], "messages[1].tool_calls"),
        ([chat_pb2.ChatMessage(role="assistant", tool_calls=[call("")])], "messages[1].tool_calls[0].id"),
        ([chat_pb2.ChatMessage(role="assistant", tool_calls=[call(arguments="[1]")])], "messages[1].tool_calls[0].function.arguments"),  # noqa: E501
        ([chat_pb2.ChatMessage(role="assistant", tool_calls=[call(arguments="{")])], "messages[1].tool_calls[0].function.arguments"),  # noqa: E501
    ],
)  # fmt: skip
def test_malformed_tool_turns_are_refused_naming_the_field(
    catalog: ModelCatalog, messages: list[chat_pb2.ChatMessage], field: str
) -> None:
    assert refused(catalog, conversation(*messages)).field == field


def test_a_model_without_a_tool_parser_refuses_tools(catalog: ModelCatalog) -> None:
    own_template = ModelSpec("plain", ModelSpec.parse(MODEL).path)  # the GGUF's template, no parser
    plain = ModelCatalog.load((own_template,))
    request = with_tools(tool())
    request.model = "plain"
    error = refused(plain, request)
    assert error.field == "tools" and "not supported by model 'plain'" in str(error)


def test_tool_call_refs_keep_the_callers_arguments(catalog: ModelCatalog) -> None:
    from gateway.tools import check_tool_turns

    turns = check_tool_turns([chat_pb2.ChatMessage(role="assistant", tool_calls=[call()])])
    assert turns == [((ToolCallRef("call_1", "get_weather", '{"city": "Paris"}'),), None)]


def test_deep_json_and_too_many_calls_are_refused_before_rendering(catalog: ModelCatalog) -> None:
    deep = '{"a":' * 40 + "1" + "}" * 40
    error = refused(
        catalog, conversation(chat_pb2.ChatMessage(role="assistant", tool_calls=[call(arguments=deep)]))
    )
    assert error.field == "messages[1].tool_calls[0].function.arguments" and "32 levels" in str(error)
    error = refused(
        catalog, with_tools(tool(parameters={"type": "object", "properties": {"a": json.loads(deep)}}))
    )
    assert error.field == "tools[0].function.parameters"
    calls = [call(f"call_{i}") for i in range(129)]
    assert (
        refused(catalog, conversation(chat_pb2.ChatMessage(role="assistant", tool_calls=calls))).field
        == "messages"
    )


def test_stop_with_required_calls_and_tool_turns_without_tool_support_are_refused(
    catalog: ModelCatalog,
) -> None:
    request = with_tools(tool(), stop=["x"])
    request.tool_choice.mode = "required"
    assert refused(catalog, request).field == "stop"
    request.tool_choice.mode = "auto"
    validate(request, catalog, 16)  # "auto" may stop: its reply is text until it calls
    plain = ModelCatalog.load((ModelSpec("plain", ModelSpec.parse(MODEL).path),))
    turns = chat_request("hi", model="plain")
    turns.messages.append(chat_pb2.ChatMessage(role="tool", content="22 C", tool_call_id="call_1"))
    error = refused(plain, turns)
    assert error.field == "messages[1].role" and "needs a model that calls tools" in str(error)
