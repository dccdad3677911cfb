"""N concurrent requests on the CPU model: the engine called directly vs the full stack.

    python -m bench.cpu_concurrency --concurrency 1 8 --tokens 64 --repeats 3

Both sides run in the same invocation on the same machine, one after the other, so
their ratio is meaningful even on a noisy shared machine. The stack side starts its
own redis-server, gateway and one worker (devstack), like `make run`.
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat_client import AsyncClient
from common.model_store import DEFAULT_MODEL_NAME
from common.models import Message, ModelSpec, PromptRenderer
from devstack import processes
from devstack.redis_server import RedisServer, free_port
from worker.config import CpuEngineSettings
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.cpu import CpuEngine

PROMPT = "Write a short story about a lighthouse keeper."


@dataclass
class Run:
    seconds: float
    tokens: int
    first_token: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


async def one_direct(engine: CpuEngine, ids: list[int], i: int, tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    first = 0.0
    count = 0
    params = SamplingParams(temperature=1.0, max_tokens=tokens, seed=i)
    async for delta in engine.generate(GenerationRequest(f"bench-{i}-{time.time_ns()}", ids, params)):
        first = first or time.perf_counter() - start
        count = delta.completion_tokens
    return count, first


async def one_stack(client: AsyncClient, i: int, tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    first = 0.0
    count = 0
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL_NAME,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=tokens,
        seed=i,
        stream=True,
    )
    async for chunk in stream:
        if chunk.choices[0].delta.content and not first:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return count, first


async def measure(calls: list[Coroutine[Any, Any, tuple[int, float]]]) -> Run:
    start = time.perf_counter()
    results = await asyncio.gather(*calls)
    return Run(time.perf_counter() - start, sum(r[0] for r in results), [r[1] for r in results])


def report(name: str, n: int, runs: list[Run]) -> float:
    tps = statistics.median(r.tokens_per_second for r in runs)
    ttft = statistics.median(t for r in runs for t in r.first_token)
    worst = statistics.median(max(r.first_token) for r in runs)
    print(f"{name:>8} x{n}: {tps:6.1f} tok/s aggregate, TTFT median {ttft:5.2f} s, slowest {worst:5.2f} s")
    return tps


async def main(concurrency: list[int], tokens: int, repeats: int) -> None:
    spec = ModelSpec.parse(DEFAULT_MODEL_NAME)
    ids = PromptRenderer(spec).render([Message("user", PROMPT)])
    engine = CpuEngine(spec, CpuEngineSettings(max_batch_size=max(concurrency)))
    await engine.start()
    direct = {
        n: [await measure([one_direct(engine, ids, i, tokens) for i in range(n)]) for _ in range(repeats)]
        for n in concurrency
    }
    await engine.stop()

    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        redis.start()
        port = free_port()
        env = {
            "REDIS_URL": redis.url,
            "GATEWAY_ADDRESS": f"127.0.0.1:{port}",
            "WORKER_MAX_CONCURRENCY": str(max(concurrency)),
        }
        gateway, worker = processes.launch("gateway", env), processes.launch("worker", env)
        try:
            processes.wait_serving(f"127.0.0.1:{port}", gateway)
            async with AsyncClient(f"127.0.0.1:{port}") as client:
                await one_stack(client, 0, 1)  # waits for the worker to be up
                stack = {
                    n: [
                        await measure([one_stack(client, i, tokens) for i in range(n)])
                        for _ in range(repeats)
                    ]
                    for n in concurrency
                }
        finally:
            processes.stop(worker)
            processes.stop(gateway)
            redis.stop()

    print(f"{tokens} tokens per request, medians of {repeats} runs")
    for n in concurrency:
        a = report("engine", n, direct[n])
        b = report("stack", n, stack[n])
        print(f"{'':>8}     stack / engine throughput = {b / a:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.concurrency, args.tokens, args.repeats))
