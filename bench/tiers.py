"""On_demand latency under an overload of flex traffic (service tiers, issue 17).

One gateway and one vLLM worker (4 sequences at once). In the background, `--flex-callers`
callers send request after request (a prompt of about 300 tokens, `--flex-tokens` greedy
tokens each): more than the worker runs at once, so a backlog builds. In the foreground,
`--requests` on_demand requests, one after another, each a short prompt and `--tokens` tokens.
Layouts, one after the other in one run, with the same traffic:
  off   the background sent on demand too: one lane, first come first served (the service
        before tiers), so the foreground waits behind the backlog
  on    the background sent as service_tier "flex": its own lane, read only with the room
        on_demand jobs leave, and vLLM request priority 1 against the foreground's 0
Per layout: the foreground's TTFT p50 / p99 and its whole latency p50, and the background's
completions per second and refusals (498 capacity_exceeded past GATEWAY_FLEX_MAX_QUEUED_JOBS).

Writes docs/benchmarks/tiers.md and docs/benchmarks/tiers.json.

    .venv/bin/python -m bench.tiers [--flex-callers 10] [--requests 12]
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
BACKGROUND_PROMPT = "Summarize this list of numbers: " + ", ".join(str(n) for n in range(150))
WARMUP_SECONDS = 5.0  # the background's backlog builds before the foreground starts


async def background(
    stub: chat_pb2_grpc.ChatServiceStub, tier: str, tokens: int, stop: asyncio.Event, counts: dict[str, int]
) -> None:
    """One background caller: request after request until stopped."""
    request = chat_pb2.ChatCompletionRequest(
        model=MODEL,
        messages=[chat_pb2.ChatMessage(role="user", content=BACKGROUND_PROMPT)],
        max_tokens=tokens,
        temperature=0,
        service_tier=tier,
    )
    while not stop.is_set():
        try:
            await stub.ChatCompletion(request, timeout=600)
            counts["completed"] += 1
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            counts["refused"] += 1
            await asyncio.sleep(0.2)  # as a caller honouring the retry delay would, roughly


async def foreground(stub: chat_pb2_grpc.ChatServiceStub, k: int, tokens: int) -> tuple[float, float]:
    """One on_demand request: (TTFT, whole latency) in seconds."""
    request = chat_pb2.ChatCompletionRequest(
        model=MODEL,
        messages=[chat_pb2.ChatMessage(role="user", content=f"Say hello to caller {k}.")],
        max_tokens=tokens,
        temperature=0,
    )
    start, first = time.perf_counter(), 0.0
    async for chunk in stub.StreamChatCompletion(request, timeout=600):
        if chunk.choices and chunk.choices[0].delta.content and not first:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


async def run_load(layout: Layout, tier: str, args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(layout.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await foreground(stub, -1, args.tokens)  # the engine warm
        stop, counts = asyncio.Event(), {"completed": 0, "refused": 0}
        callers = [
            asyncio.create_task(background(stub, tier, args.flex_tokens, stop, counts))
            for _ in range(args.flex_callers)
        ]
        await asyncio.sleep(WARMUP_SECONDS)
        started, done_before = time.perf_counter(), counts["completed"]
        timings = [await foreground(stub, k, args.tokens) for k in range(args.requests)]
        seconds = time.perf_counter() - started
        background_done = counts["completed"] - done_before
        stop.set()
        await asyncio.gather(*callers)
    ttfts, latencies = sorted(t for t, _ in timings), sorted(total for _, total in timings)
    return {
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "latency_p50": statistics.median(latencies),
        "background_per_second": background_done / seconds,
        "background_refused": counts["refused"],
        "seconds": seconds,
    }


def run_layout(name: str, args: argparse.Namespace) -> dict[str, Any]:
    layout = Layout(f"tiers-{name}", 1, kv_cache_gib=0.5)
    try:
        layout.start()
        return asyncio.run(run_load(layout, "flex" if name == "on" else "on_demand", args))
    finally:
        layout.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--flex-callers", type=int, default=10, help="background callers, each one call at a time"
    )
    parser.add_argument("--flex-tokens", type=int, default=48)
    parser.add_argument("--requests", type=int, default=12, help="on_demand requests in the foreground")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--layouts", default="off,on")
    args = parser.parse_args()
    results = {}
    for name in args.layouts.split(","):
        results[name] = run_layout(name, args)
        print(name, json.dumps(results[name]), flush=True)
    meta = run_meta(args)
    (OUT / "tiers.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_markdown(meta, results, OUT / "tiers.md")


def write_markdown(meta: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    a = meta["args"]
    lines = [
        "# On_demand latency under an overload of flex traffic: service tiers on and off",
        "",
        f"`.venv/bin/python -m bench.tiers --flex-callers {a['flex_callers']} --requests {a['requests']}`"
        f" ({meta['date']}, {meta['machine']}; vLLM on CPU, float32, one worker running 4 sequences).",
        f"{a['flex_callers']} background callers send request after request ({a['flex_tokens']} greedy"
        " tokens of a ~300-token prompt each), more than the worker runs at once; meanwhile"
        f" {a['requests']} on_demand requests ({a['tokens']} tokens each) run one after another."
        " `off`: the background sent on demand too (one lane, first come first served, the service"
        " before tiers); `on`: the background sent as `service_tier: flex` (its own lane, read after"
        " on_demand, vLLM priority 1).",
        "",
        "| layout | on_demand TTFT p50 / p99 ms | on_demand latency p50 ms | background completions/s |"
        " background refused (498) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['ttft_p50'] * 1000:.0f} / {r['ttft_p99'] * 1000:.0f}"
            f" | {r['latency_p50'] * 1000:.0f} | {r['background_per_second']:.2f}"
            f" | {r['background_refused']} |"
        )
    if {"off", "on"} <= results.keys():
        ratio = results["off"]["ttft_p50"] / max(results["on"]["ttft_p50"], 1e-9)
        lines += ["", f"TTFT p50, off / on: {ratio:.1f}x (same run)."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
