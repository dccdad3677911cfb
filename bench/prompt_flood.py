"""Prompt flood: do maximum-size prompts from one client stall everybody else's streams?

8 ordinary streams (closed loop, the benchmark engine at 50 tokens/s per stream) run first
alone, then beside one client that sends prompts of GATEWAY_MAX_PROMPT_CHARS characters
(200,000) on --flood-calls concurrent calls, each the next as soon as the last is answered.
Such a prompt tokenizes to more than the model's context window, so the gateway refuses it
after tokenizing: all the cost is the gateway's, none the worker's. Reports the ordinary
streams' inter-token latency (p50/p95/p99) in both phases and how the flood was answered.

    .venv/bin/python -m bench.prompt_flood [--seconds 20] [--flood-calls 4] [--auth]

--auth turns GATEWAY_AUTH on: the ordinary streams use an unlimited key, the flood a key
with 60 requests per minute. Results: docs/benchmarks/prompt_flood.md.
"""

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import grpc
import redis.asyncio

from bench.loadgen import MODEL, Report, Sample, closed_loop, request
from chat.v1 import chat_pb2, chat_pb2_grpc
from devstack.local_stack import LocalStack
from gateway import apikeys

MAX_PROMPT_CHARS = 200_000  # GATEWAY_MAX_PROMPT_CHARS' default
_WORDS = ("hello", "world", "prompt", "flood", "token", "stream", "gateway", "latency")


def flood_request(chars: int) -> chat_pb2.ChatCompletionRequest:
    rng = random.Random(0)
    text = " ".join(rng.choice(_WORDS) for _ in range(chars // 4))[:chars]
    r = chat_pb2.ChatCompletionRequest(model=MODEL, max_tokens=1)
    r.messages.add(role="user", content=text)
    return r


async def stream_with(
    stub: chat_pb2_grpc.ChatServiceStub,
    req: chat_pb2.ChatCompletionRequest,
    metadata: tuple[tuple[str, str], ...],
) -> Sample:
    sample = Sample()
    try:
        async for chunk in stub.StreamChatCompletion(req, timeout=300, metadata=metadata):
            sample.arrived(chunk.choices[0].delta.content)
    except grpc.aio.AioRpcError as exc:
        sample.error, sample.detail = exc.code().name, exc.details() or ""
    sample.done()
    return sample


async def flood(
    target: str, calls: int, metadata: tuple[tuple[str, str], ...], stop: asyncio.Event
) -> Counter[str]:
    """Sends maximum-size prompts on `calls` concurrent calls until stopped; counts the answers."""
    answers: Counter[str] = Counter()
    req = flood_request(MAX_PROMPT_CHARS)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def caller() -> None:
            while not stop.is_set():
                try:
                    await stub.ChatCompletion(req, timeout=60, metadata=metadata)
                    answers["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    answers[exc.code().name] += 1
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.01)  # a rate-limited flooder retries at once too

        await asyncio.gather(*(caller() for _ in range(calls)))
    return answers


async def phase(
    target: str, args: argparse.Namespace, keys: dict[str, str], flooding: bool
) -> tuple[Report, dict[str, int]]:
    ordinary = (("authorization", f"Bearer {keys['ordinary']}"),) if keys else ()
    flooder = (("authorization", f"Bearer {keys['flood']}"),) if keys else ()
    stop = asyncio.Event()
    flooder_task = asyncio.ensure_future(flood(target, args.flood_calls, flooder, stop)) if flooding else None
    await asyncio.sleep(1.0 if flooding else 0.0)  # the flood is under way before measuring
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        req = request(16, args.max_tokens)
        label = "8 streams + flood" if flooding else "8 streams alone"
        report = await closed_loop(
            lambda: stream_with(stub, req, ordinary), args.streams, args.seconds, label
        )
    stop.set()
    answers = dict(await flooder_task) if flooder_task is not None else {}
    return report, answers


async def make_keys(redis_url: str) -> dict[str, str]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        return {
            "ordinary": await apikeys.create(client, "ordinary", ["*"], 0, 0),
            "flood": await apikeys.create(client, "flood", ["*"], 60, 0),
        }
    finally:
        await client.aclose()


async def warm_up(target: str, metadata: tuple[tuple[str, str], ...]) -> None:
    """Waits until the worker has loaded and answers."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await stub.ChatCompletion(request(4, 1), timeout=120, metadata=metadata)


async def run(args: argparse.Namespace, stack: LocalStack) -> dict[str, object]:
    keys = await make_keys(stack.redis.url) if args.auth else {}
    await warm_up(stack.address, (("authorization", f"Bearer {keys['ordinary']}"),) if keys else ())
    alone, _ = await phase(stack.address, args, keys, flooding=False)
    flooded, answers = await phase(stack.address, args, keys, flooding=True)
    return {
        "auth": args.auth,
        "streams": args.streams,
        "flood_calls": args.flood_calls,
        "seconds": args.seconds,
        "alone": asdict(alone),
        "flooded": asdict(flooded),
        "flood_answers": answers,
        "itl_p99_ms": {"alone": alone.itl_ms["p99"], "flooded": flooded.itl_ms["p99"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--streams", type=int, default=8, help="ordinary concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=100, help="tokens per ordinary stream")
    parser.add_argument("--flood-calls", type=int, default=4, help="the flooder's concurrent calls")
    parser.add_argument("--auth", action="store_true", help="GATEWAY_AUTH=on, the flood on a 60 RPM key")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    env = {
        "WORKER_ENGINE": "bench",
        "WORKER_BENCH_TOKENS_PER_SECOND": "50",
        "WORKER_MAX_CONCURRENCY": "64",
        "GATEWAY_AUTH": "on" if args.auth else "off",
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(tmp), env) as stack:
        result = asyncio.run(run(args, stack))
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
