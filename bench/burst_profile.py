"""Where the time to first token of a burst goes: 8 streams sent at once to a fresh stack.

    .venv/bin/python -m bench.burst_profile [--streams 8] [--rounds 3]

Starts redis-server, a gateway and one vLLM worker, sends `--streams` streaming requests
at once, and prints per request the time to first token, the time its job waited in
Redis (usage.queue_time) and the time from the worker taking it to its first token
(usage.prompt_time), sorted. It shows how jobs of one burst reach the engine.
"""

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import grpc

from chat.v1 import chat_pb2, chat_pb2_grpc
from common.model_store import DEFAULT_MODEL_NAME
from devstack.local_stack import LocalStack

PROMPT = "Write a long story about a lighthouse keeper and a storm."


async def one(stub: chat_pb2_grpc.ChatServiceStub, seed: int) -> tuple[float, float, float]:
    request = chat_pb2.ChatCompletionRequest(
        model=DEFAULT_MODEL_NAME, max_tokens=64, temperature=0.7, seed=seed
    )
    request.messages.add(role="user", content=PROMPT)
    start = time.perf_counter()
    first = 0.0
    usage = chat_pb2.Usage()
    async for chunk in stub.StreamChatCompletion(request):
        if chunk.choices[0].delta.content and not first:
            first = time.perf_counter() - start
        if chunk.HasField("usage"):
            usage = chunk.usage
    return first, usage.queue_time, usage.prompt_time


async def main(streams: int, rounds: int) -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalStack(Path(tmp), {"WORKER_MAX_CONCURRENCY": str(max(streams, 8))}) as stack,
    ):
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            await one(stub, 0)  # waits for the worker; warms every path
            for r in range(rounds):
                results = await asyncio.gather(*(one(stub, i) for i in range(streams)))
                print(f"round {r + 1}")
                for name, column in (("TTFT", 0), ("queue_time", 1), ("prompt_time", 2)):
                    print(f"  {name:>11} ms: {sorted(round(x[column] * 1000, 1) for x in results)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.streams, args.rounds))
