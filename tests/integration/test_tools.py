"""Tool calling through the whole stack on vLLM, with the official SDKs and gRPC.

The bundled SmolLM2-135M-Instruct is shown the tools in its own tool format
(common/chat_templates/smollm2.jinja); its calls are read by vLLM's xlam parser. With
tool_choice "required" or a named function the reply is constrained to calls whose arguments
follow the tools' schemas, so those tests do not depend on what a 135M model chooses to do.
Left to "auto" it answers these questions in text; and with parallel calls allowed, "required"
replies of this model tend to repeat calls up to max_tokens, so the round trips ask for one.
"""

import json
from typing import Any

import groq
import openai
import pytest

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client import Client
from tests.integration.examples import EXAMPLES, run_example
from tests.integration.stack import MODEL, Stack, chat_request

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city, e.g. San Francisco"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _client(sdk: str, openai_client: openai.OpenAI, groq_client: groq.Groq) -> Any:
    return openai_client if sdk == "openai" else groq_client


def get_current_weather(location: str, unit: str = "celsius") -> str:
    """The tool the round trip 'runs'."""
    return json.dumps({"location": location, "temperature": "22", "unit": unit})


@pytest.mark.parametrize("sdk", ["groq", "openai"])
def test_a_weather_round_trip_as_in_the_sdks_docs(
    sdk: str, openai_client: openai.OpenAI, groq_client: groq.Groq
) -> None:
    """tool definition -> tool call -> tool result -> final answer, written as the SDKs' docs do."""
    client = _client(sdk, openai_client, groq_client)
    messages: list[Any] = list(QUESTION)
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=128,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(call.type == "function" for call in calls)
    messages.append(choice.message)  # the SDK's own message object, sent back as it is
    for call in calls:
        assert call.function.name == "get_current_weather"
        arguments = json.loads(call.function.arguments)
        assert isinstance(arguments["location"], str)  # the schema's required property
        messages.append(
            {
                "role": "tool",
                "tool_call_id": call.id,
                "name": call.function.name,
                "content": get_current_weather(**arguments),
            }
        )
    final = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content
    assert final.choices[0].message.tool_calls is None
    # The call and its result are in the final turn's prompt.
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)
    assert final.usage.prompt_tokens > plain.usage.prompt_tokens + 20


@pytest.mark.parametrize("sdk", ["groq", "openai"])
def test_a_named_function_is_called_with_arguments_that_follow_its_schema(
    sdk: str, openai_client: openai.OpenAI, groq_client: groq.Groq
) -> None:
    client = _client(sdk, openai_client, groq_client)
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[TIME_TOOL, WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=48,
        temperature=1.0,
        seed=3,
    )
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert set(json.loads(call.function.arguments)) >= {"zone"}
    assert call.id.startswith("call_")


@pytest.mark.parametrize("sdk", ["groq", "openai"])
def test_streamed_tool_calls_arrive_as_the_sdks_expect(
    sdk: str, openai_client: openai.OpenAI, groq_client: groq.Groq
) -> None:
    client = _client(sdk, openai_client, groq_client)
    args: dict[str, Any] = {
        "model": MODEL,
        "messages": QUESTION,
        "tools": [WEATHER_TOOL],
        "max_tokens": 128,
        "parallel_tool_calls": False,
    }
    whole = client.chat.completions.create(tool_choice="required", seed=5, temperature=0, **args)
    stream = client.chat.completions.create(
        tool_choice="required", seed=5, temperature=0, stream=True, **args
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for part in choice.delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += part.id or ""
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    expected = [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls
    ]
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == expected
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_auto_replies_with_text_or_calls_that_name_a_tool(openai_client: openai.OpenAI) -> None:
    """ "auto": the model decides; whatever it wrote is either text or calls parsed by vLLM's parser."""
    for question in ("What is the weather like in Paris today?", "Say hello to me."):
        response = openai_client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            tools=[WEATHER_TOOL],
            max_tokens=128,
            temperature=0,
        )
        choice = response.choices[0]
        if choice.finish_reason == "tool_calls":
            assert all(c.function.name == "get_current_weather" for c in choice.message.tool_calls or [])
            assert all(
                isinstance(json.loads(c.function.arguments), dict) for c in choice.message.tool_calls or []
            )
        else:
            assert choice.message.tool_calls is None
            assert choice.message.content is not None
            assert "<tool_call>" not in choice.message.content or choice.finish_reason == "length"


def test_tool_choice_none_replies_with_text(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=16
    )
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason in ("stop", "length")


def test_grpc_and_the_python_client_call_tools(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub) -> None:
    request = chat_request("What is the weather like in Paris today?", max_tokens=128, temperature=0.0)
    function = WEATHER_TOOL["function"]
    request.tools.append(
        chat_pb2.Tool(
            type="function",
            function=chat_pb2.FunctionDefinition(
                name=function["name"],
                description=function["description"],
                parameters=json.dumps(function["parameters"]),
            ),
        )
    )
    request.tool_choice.mode = "required"
    request.parallel_tool_calls = False
    response = stub.ChatCompletion(request, timeout=60)
    assert response.choices[0].finish_reason == "tool_calls"
    calls = response.choices[0].message.tool_calls
    assert calls[0].function.name == "get_current_weather"
    chunks = list(stub.StreamChatCompletion(request, timeout=60))
    streamed = [call for chunk in chunks for c in chunk.choices for call in c.delta.tool_calls]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # A finished completion read back by id has its calls too.
    again = stub.GetChatCompletion(chat_pb2.GetChatCompletionRequest(id=chunks[0].id), timeout=30)
    names = [c.function.name for c in again.choices[0].message.tool_calls]
    assert names == [c.function.name for c in streamed]
    assert again.choices[0].finish_reason == "tool_calls"
    models = stub.ListModels(chat_pb2.ListModelsRequest(), timeout=10)
    assert [m.supports_tools for m in models.data] == [True]

    with Client(stack.address) as client:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=128,
            temperature=0,
        )
    assert reply.choices[0].message.tool_calls[0].function.name == "get_current_weather"


def test_parallel_tool_calls_false_makes_one_call(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris, and the time in Tokyo?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=128,
    )
    assert len(response.choices[0].message.tool_calls) == 1


def test_calls_that_do_not_fit_max_tokens_are_a_tool_use_failed_400(groq_client: groq.Groq) -> None:
    with pytest.raises(groq.BadRequestError) as caught:
        groq_client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=4
        )
    body: Any = caught.value.body
    assert body["error"]["code"] == "tool_use_failed" and "cut off by max_tokens" in body["error"]["message"]
    assert body["error"]["failed_generation"].startswith("[{")  # the calls, cut off


def test_list_models_says_the_bundled_model_calls_tools(openai_client: openai.OpenAI) -> None:
    (model,) = openai_client.models.list().data
    assert model.id == MODEL and model.supports_tools  # type: ignore[attr-defined]


async def test_the_groq_tool_use_example_runs_unchanged(stack: Stack) -> None:
    """examples/groq/tool_use.py, as a user runs it: its own process, only GROQ_BASE_URL set."""
    env = {"GROQ_BASE_URL": stack.http_url, "GROQ_API_KEY": "unused-when-auth-is-off"}
    code, out, err = await run_example(EXAMPLES / "groq" / "tool_use.py", env)
    assert code == 0, err
    called, answer = out.strip().split("\n", 1)
    assert called.startswith("called get_current_weather({'location': ") and '"temperature": "22"' in called
    assert answer.strip()
