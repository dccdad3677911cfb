"""Errors of the HTTP API raise the SDKs' own typed exceptions with the right fields."""

import asyncio
import time
from typing import Any

import groq
import httpx
import openai
import pytest
import redis

from tests.integration.stack import MODEL, Stack, running_requests, scrape

HI = [{"role": "user", "content": "Say hi."}]
# For tests that leave before the end: a greedy reply that outlasts them ("Say hi." may end at once).
ESSAY = [{"role": "user", "content": "Write a long essay about mountains."}]


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"temperature": 3.5}, "temperature", None),
        ({"top_p": 0}, "top_p", None),
        ({"max_completion_tokens": 0}, "max_completion_tokens", None),
        ({"max_tokens": 100_000}, "max_tokens", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ({"n": 9}, "n", None),
        ({"service_tier": "scale"}, "service_tier", "unsupported_parameter"),
        ({"n": 0}, "n", None),
        (
            {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
            "tools[0].function.name",
            None,
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", None),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools[0].function.parameters",
            None,
        ),
        ({"tool_choice": "auto"}, "tool_choice", None),  # without tools
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
            "tool_choice",
            None,
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice.function.name",
            None,
        ),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"logprobs": "yes"}, "logprobs", None),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
        ({"top_logprobs": 2}, "top_logprobs", None),
        ({"logit_bias": {"1": 2}}, "logit_bias", "unsupported_parameter"),
        ({"frequency_penalty": 2.5}, "frequency_penalty", None),
        ({"presence_penalty": -3}, "presence_penalty", None),
        ({"parallel_tool_calls": True}, "parallel_tool_calls", None),  # without tools
        ({"response_format": {"type": "xml"}}, "response_format.type", None),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
            "response_format.json_schema.schema",
            None,
        ),
        ({"response_format": {"type": "json_object"}, "stop": "x"}, "stop", None),
        ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ],
)
def test_bad_requests_raise_bad_request_error_naming_the_parameter(
    openai_client: openai.OpenAI, groq_client: groq.Groq, fields: dict[str, Any], param: str, code: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=MODEL, messages=HI, **fields)
    error = caught.value
    assert error.status_code == 400 and error.param == param and error.code == code
    assert error.type == "invalid_request_error" and param.split(".")[0] in error.message
    with pytest.raises(groq.BadRequestError) as groq_caught:
        groq_client.chat.completions.create(model=MODEL, messages=HI, extra_body=fields)  # type: ignore[arg-type]
    assert isinstance(groq_caught.value.body, dict) and groq_caught.value.body["error"]["param"] == param


def test_unknown_fields_are_refused(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=MODEL, messages=HI, extra_body={"temprature": 0.1})
    assert caught.value.param == "temprature" and "not a known parameter" in caught.value.message


def test_unknown_model_is_not_found_with_model_not_found(groq_client: groq.Groq) -> None:
    with pytest.raises(groq.NotFoundError) as caught:
        groq_client.chat.completions.create(model="gpt-9", messages=HI)
    assert caught.value.status_code == 404 and caught.value.body["error"]["code"] == "model_not_found"  # type: ignore[index]


def test_a_body_over_the_size_limit_is_413(openai_client: openai.OpenAI) -> None:
    big = [{"role": "user", "content": "x" * (1 << 20)}]  # over GATEWAY_MAX_REQUEST_BYTES (1 MiB)
    with pytest.raises(openai.APIStatusError) as caught:
        openai_client.chat.completions.create(model=MODEL, messages=big)  # type: ignore[arg-type]
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"


@pytest.mark.parametrize("stream", [False, True])
def test_json_cut_off_is_json_validate_failed_with_the_generation(
    groq_client: groq.Groq, stream: bool
) -> None:
    with pytest.raises(groq.APIError) as caught:
        reply = groq_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a cat with name and age."}],
            max_tokens=4, temperature=0, response_format={"type": "json_object"}, stream=stream,  # type: ignore[call-overload]
        )  # fmt: skip
        if stream:
            list(reply)
    body = caught.value.body
    error = body.get("error", body) if isinstance(body, dict) else {}
    assert error["code"] == "json_validate_failed" and error["type"] == "invalid_request_error"
    assert isinstance(error["failed_generation"], str) and error["failed_generation"]
    if not stream:
        assert isinstance(caught.value, groq.BadRequestError)


def aborts(stack: Stack) -> float:
    return sum(
        scrape(port).get(f'chat_worker_aborts_total{{model="{MODEL}",reason="cancelled"}}', 0.0)
        for port in stack.worker_metrics_ports
    )


async def test_a_disconnect_mid_stream_aborts_the_job(stack: Stack, redis_client: redis.Redis) -> None:
    before = aborts(stack)
    body = {"model": MODEL, "messages": ESSAY, "max_tokens": 2000, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=30) as client:
        async with client.stream("POST", "/openai/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            seen = 0
            while seen < 3:
                seen += (await anext(lines)).startswith("data: ")
            # Leaving the block closes the connection mid-stream.
        disconnected = time.monotonic()
    port = stack.worker_metrics_ports[0]
    while running_requests(port) or aborts(stack) < before + 1:
        assert time.monotonic() - disconnected < 10, "the job was not aborted"
        await asyncio.sleep(0.01)
    print(f"HTTP disconnect -> engine abort: {(time.monotonic() - disconnected) * 1000:.0f} ms")


def cancelled_jobs(stack: Stack) -> float:
    """Jobs that ended cancelled: aborted in the engine, or never started (caller left while queued)."""
    return sum(
        scrape(port).get(f'chat_worker_jobs_total{{model="{MODEL}",outcome="cancelled"}}', 0.0)
        for port in stack.worker_metrics_ports
    )


async def test_a_unary_caller_that_gives_up_has_its_job_aborted(stack: Stack) -> None:
    # On a loaded machine the job may still be queued when the caller leaves: then the worker
    # never starts it, which counts as a cancelled job but not as an engine abort.
    before = cancelled_jobs(stack)
    body = {"model": MODEL, "messages": ESSAY, "max_tokens": 2000, "temperature": 0}
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):  # the client closes the connection
            await client.post("/openai/v1/chat/completions", json=body)
    gave_up = time.monotonic()
    while running_requests(stack.worker_metrics_ports[0]) or cancelled_jobs(stack) < before + 1:
        assert time.monotonic() - gave_up < 10, "the job was not aborted"
        await asyncio.sleep(0.01)
