"""The Groq/OpenAI-compatible HTTP API through the real groq and openai SDKs, against the stack.

Assertions check shapes, finish reasons, usage and error types, never the generated text,
so they hold for any engine.
"""

import json
import time
import urllib.error
import urllib.request
from typing import Any

import groq
import openai
import pytest
from pydantic import BaseModel

from tests.integration.stack import MODEL, Stack, scrape

ALIAS = "mixtral-8x7b-32768"  # a reference model name, mapped by GATEWAY_MODEL_ALIASES
HI = [{"role": "system", "content": "you are a helpful assistant."}, {"role": "user", "content": "Say hi."}]


def assert_usage(usage: Any, max_tokens: int) -> None:
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.queue_time >= 0 and usage.prompt_time >= 0 and usage.completion_time >= 0
    assert usage.total_time == pytest.approx(usage.prompt_time + usage.completion_time)


def test_groq_unary_completion_has_the_reference_shape(groq_client: groq.Groq) -> None:
    completion = groq_client.chat.completions.create(
        messages=HI, model=ALIAS, temperature=0.5, max_tokens=8, top_p=1, stop=None, stream=False, seed=7,
        user="test-user",
    )  # fmt: skip
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == MODEL  # responses name the served model
    choice = completion.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and completion.system_fingerprint
    assert_usage(completion.usage, 8)
    assert completion.x_groq is not None and completion.x_groq.id.startswith("req_")


def test_openai_unary_with_max_completion_tokens_and_a_stop_list(openai_client: openai.OpenAI) -> None:
    completion = openai_client.chat.completions.create(
        model=MODEL, messages=HI, max_completion_tokens=6, stop=["\n\n\n", "zzz"], temperature=0
    )
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 6


def test_groq_stream_has_role_text_finish_and_x_groq_usage(groq_client: groq.Groq) -> None:
    chunks = list(groq_client.chat.completions.create(messages=HI, model=ALIAS, max_tokens=6, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert last.x_groq is not None and last.x_groq.usage is not None
    assert_usage(last.x_groq.usage, 6)


def test_openai_stream_with_include_usage_ends_with_a_usage_chunk(openai_client: openai.OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model=ALIAS, messages=HI, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5 or chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


async def test_async_and_async_streaming(stack: Stack) -> None:
    async with groq.AsyncGroq(base_url=stack.http_url, api_key="unused", max_retries=0) as client:
        completion = await client.chat.completions.create(messages=HI, model=ALIAS, max_tokens=4)
        assert completion.choices[0].message.content
        stream = await client.chat.completions.create(messages=HI, model=ALIAS, max_tokens=4, stream=True)
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert "".join(c.choices[0].delta.content or "" for c in chunks)


class Pet(BaseModel):
    name: str
    age: int


PET_SCHEMA = Pet.model_json_schema()


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {
            "type": "json_schema",
            "json_schema": {"name": "pet", "schema": Pet.model_json_schema(), "strict": True},
        },
    ],
)
def test_json_mode_gives_json_or_json_validate_failed(
    groq_client: groq.Groq, response_format: dict[str, Any]
) -> None:
    # A real model answers with JSON; the benchmark engine cannot, and gets the reference's error.
    try:
        completion = groq_client.chat.completions.create(
            messages=[{"role": "user", "content": "A JSON pet with name and age."}],
            model=ALIAS, max_tokens=60, temperature=0, response_format=response_format,  # type: ignore[arg-type]
        )  # fmt: skip
    except groq.BadRequestError as exc:
        assert isinstance(exc.body, dict) and exc.body["error"]["code"] == "json_validate_failed"
        assert isinstance(exc.body["error"]["failed_generation"], str)
        return
    content = completion.choices[0].message.content or ""
    assert isinstance(json.loads(content), dict)
    if response_format["type"] == "json_schema":
        Pet.model_validate_json(content)


def test_models_list_and_retrieve(groq_client: groq.Groq, openai_client: openai.OpenAI) -> None:
    assert [m.id for m in groq_client.models.list().data] == [MODEL]
    assert openai_client.models.retrieve(ALIAS).id == ALIAS
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_health_and_readiness(stack: Stack) -> None:
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(f"{stack.http_url}{path}", timeout=5) as reply:
            assert reply.status == 200 and json.loads(reply.read())["status"] == "ok"


def test_http_calls_are_counted_with_a_transport_label(groq_client: groq.Groq, stack: Stack) -> None:
    key = f'code="OK",model="{MODEL}",rpc="ChatCompletion",transport="http"'
    before = scrape(stack.gateway_metrics_port).get(f"chat_gateway_requests_total{{{key}}}", 0.0)
    groq_client.chat.completions.create(messages=HI, model=ALIAS, max_tokens=1)
    deadline = time.monotonic() + 5
    while scrape(stack.gateway_metrics_port)[f"chat_gateway_requests_total{{{key}}}"] != before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_body_that_is_not_json_is_a_400_in_the_error_shape(stack: Stack) -> None:
    request = urllib.request.Request(
        f"{stack.http_url}/v1/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 400
    error = json.loads(caught.value.read())["error"]
    assert error["type"] == "invalid_request_error" and "not valid JSON" in error["message"]
