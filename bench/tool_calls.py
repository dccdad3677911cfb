"""What tool calling costs and how often the bundled model calls as asked (issue 17).

One gateway and one vLLM worker. The same question ("What is the weather like in <city>?"),
`--requests` times per mode with temperature 1 and seeds 0, 1, ..., sent one after another:
  text                no tools: the baseline
  auto                one tool offered, tool_choice "auto": the model decides
  required            tool_choice "required", parallel calls allowed
  required_single     tool_choice "required", parallel_tool_calls false (one call)
  named               tool_choice naming the function
Per mode: how the replies ended (valid calls, text, or 400 tool_use_failed), the median
latency, prompt and completion tokens. The prompt carries the tools (its token count is what
offering them costs); the outcome counts are what docs/api.md says of the model.

Writes docs/benchmarks/tool_calls.md and docs/benchmarks/tool_calls.json.

    .venv/bin/python -m bench.tool_calls [--requests 20]
"""

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import grpc

from bench.affinity import OUT, Layout, run_meta
from chat.v1 import chat_pb2, chat_pb2_grpc
from common.model_store import DEFAULT_MODEL_NAME

MODEL = DEFAULT_MODEL_NAME
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo"]
WEATHER = chat_pb2.Tool(
    type="function",
    function=chat_pb2.FunctionDefinition(
        name="get_current_weather",
        description="Get the current weather in a given location",
        parameters=json.dumps(
            {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city, e.g. San Francisco"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            }
        ),
    ),
)
MODES = ["text", "auto", "required", "required_single", "named"]


def request(mode: str, seed: int, max_tokens: int) -> chat_pb2.ChatCompletionRequest:
    city = CITIES[seed % len(CITIES)]
    message = chat_pb2.ChatMessage(role="user", content=f"What is the weather like in {city} today?")
    req = chat_pb2.ChatCompletionRequest(
        model=MODEL, messages=[message], max_tokens=max_tokens, temperature=1.0, seed=seed
    )
    if mode == "text":
        return req
    req.tools.append(WEATHER)
    if mode in ("required", "required_single"):
        req.tool_choice.mode = "required"
    elif mode == "named":
        req.tool_choice.mode, req.tool_choice.function_name = "function", "get_current_weather"
    if mode == "required_single":
        req.parallel_tool_calls = False
    return req


async def run_mode(
    stub: chat_pb2_grpc.ChatServiceStub, mode: str, args: argparse.Namespace
) -> dict[str, Any]:
    outcomes = {"calls": 0, "text": 0, "tool_use_failed": 0}
    latencies, prompt_tokens, completion_tokens, calls_per_reply = [], [], [], []
    for seed in range(args.requests):
        start = time.perf_counter()
        try:
            reply = await stub.ChatCompletion(request(mode, seed, args.max_tokens), timeout=600)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or "tool calls are not valid" not in (
                exc.details() or ""
            ):
                raise
            outcomes["tool_use_failed"] += 1
            latencies.append(time.perf_counter() - start)
            continue
        latencies.append(time.perf_counter() - start)
        choice = reply.choices[0]
        if choice.finish_reason == "tool_calls":
            outcomes["calls"] += 1
            calls_per_reply.append(len(choice.message.tool_calls))
        else:
            outcomes["text"] += 1
        prompt_tokens.append(reply.usage.prompt_tokens)
        completion_tokens.append(reply.usage.completion_tokens)
    return {
        **outcomes,
        "latency_p50": statistics.median(latencies),
        "prompt_tokens": statistics.median(prompt_tokens) if prompt_tokens else 0,
        "completion_tokens_p50": statistics.median(completion_tokens) if completion_tokens else 0,
        "calls_per_reply_max": max(calls_per_reply, default=0),
    }


async def run_all(layout: Layout, args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(layout.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await stub.ChatCompletion(request("text", 0, 4), timeout=600)  # the engine warm
        results = {}
        for mode in args.modes.split(","):
            results[mode] = await run_mode(stub, mode, args)
            print(mode, json.dumps(results[mode]), flush=True)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20, help="requests per mode, seeds 0..n-1")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    layout = Layout("tools", 1, kv_cache_gib=0.5)
    try:
        layout.start()
        results = asyncio.run(run_all(layout, args))
    finally:
        layout.stop()
    meta = run_meta(args)
    (OUT / "tool_calls.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_markdown(meta, results, OUT / "tool_calls.md")


def write_markdown(meta: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    a = meta["args"]
    lines = [
        "# Tool calling with the bundled model: outcomes and cost",
        "",
        f"`.venv/bin/python -m bench.tool_calls --requests {a['requests']}` ({meta['date']},"
        f" {meta['machine']}; vLLM on CPU, float32, one worker). Per mode, {a['requests']} requests"
        ' one after another: "What is the weather like in <city> today?" with one weather tool,'
        f" temperature 1, seeds 0..{a['requests'] - 1}, max_tokens {a['max_tokens']}.",
        "",
        "| mode | valid calls | text | 400 tool_use_failed | most calls in a reply | latency p50 ms"
        " | prompt tokens | completion tokens p50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['calls']} | {r['text']} | {r['tool_use_failed']} | {r['calls_per_reply_max']}"
            f" | {r['latency_p50'] * 1000:.0f} | {r['prompt_tokens']:.0f}"
            f" | {r['completion_tokens_p50']:.0f} |"
        )
    lines += [
        "",
        "Latency follows the reply's length: text and `auto` replies run to max_tokens, calls end early.",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
