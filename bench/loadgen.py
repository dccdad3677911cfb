"""Async gRPC load generator for chat.v1.ChatService.

Closed loop: N concurrent callers, each sending its next request when the last ends.
Open loop: requests arrive as a Poisson process at a given rate, whatever the replies do.

    .venv/bin/python -m bench.loadgen --target localhost:50051 --concurrency 16 --seconds 10
    .venv/bin/python -m bench.loadgen --target localhost:50051 --rate 20 --seconds 10 --json out.json

Reports time to first token, inter-token latency and end-to-end latency (p50/p95/p99),
output tokens/s, requests/s and errors.
"""

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import grpc

from chat.v1 import chat_pb2, chat_pb2_grpc

MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Sample:
    """One request as the client saw it; created when the request is sent."""

    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)  # one gap per token (a chunk of k tokens gives k gaps)
    e2e: float = 0.0
    tokens: int = 0
    error: str = ""
    detail: str = ""  # the error's message
    start: float = field(default_factory=time.perf_counter)
    last: float = 0.0  # when the latest text arrived

    def arrived(self, text: str) -> None:
        """Records a piece of generated text arriving now."""
        k = count_tokens(text)
        if not k:
            return
        now = time.perf_counter()
        if self.tokens == 0:
            self.ttft = now - self.start  # tokens that come with the first one are part of it
        else:
            self.itl.extend([(now - self.last) / k] * k)  # a chunk's gap, shared by its tokens
        self.tokens += k
        self.last = now

    def done(self) -> None:
        self.e2e = time.perf_counter() - self.start


@dataclass
class Report:
    requests: int
    errors: int
    seconds: float
    output_tokens_per_second: float
    requests_per_second: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    error_kinds: dict[str, int]
    error_examples: list[str]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50": round(at(0.50), 3), "p95": round(at(0.95), 3), "p99": round(at(0.99), 3)}


def summarize(samples: list[Sample], seconds: float) -> Report:
    ok = [s for s in samples if not s.error]
    kinds: dict[str, int] = {}
    for s in samples:
        if s.error:
            kinds[s.error] = kinds.get(s.error, 0) + 1
    tokens = sum(s.tokens for s in ok)
    return Report(
        requests=len(samples),
        errors=len(samples) - len(ok),
        seconds=round(seconds, 3),
        output_tokens_per_second=round(tokens / seconds, 1),
        requests_per_second=round(len(ok) / seconds, 2),
        ttft_ms=percentiles([s.ttft for s in ok]),
        itl_ms=percentiles([gap for s in ok for gap in s.itl]),
        e2e_ms=percentiles([s.e2e for s in ok]),
        error_kinds=kinds,
        error_examples=sorted({s.detail for s in samples if s.detail})[:5],
    )


def request(prompt_words: int, max_tokens: int) -> chat_pb2.ChatCompletionRequest:
    r = chat_pb2.ChatCompletionRequest(model=MODEL, max_tokens=max_tokens, temperature=0)
    r.messages.add(role="user", content=" ".join(["hello"] * prompt_words))
    return r


def count_tokens(text: str) -> int:
    """Tokens in a chunk of benchmark-engine text ("t1 t2 "); other text counts as one."""
    return max(1, text.count(" ")) if text else 0


async def stream_once(stub: chat_pb2_grpc.ChatServiceStub, req: chat_pb2.ChatCompletionRequest) -> Sample:
    sample = Sample()
    try:
        async for chunk in stub.StreamChatCompletion(req, timeout=300):
            sample.arrived(chunk.choices[0].delta.content)
    except grpc.aio.AioRpcError as exc:
        sample.error, sample.detail = exc.code().name, exc.details() or ""
    sample.done()
    return sample


async def unary_once(stub: chat_pb2_grpc.ChatServiceStub, req: chat_pb2.ChatCompletionRequest) -> Sample:
    sample = Sample()
    try:
        reply = await stub.ChatCompletion(req, timeout=300)
        sample.tokens = reply.usage.completion_tokens
    except grpc.aio.AioRpcError as exc:
        sample.error = exc.code().name
    sample.done()
    sample.ttft = sample.e2e  # a unary reply's first token arrives with its last
    return sample


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, seconds: float) -> None:
        self.label, self.seconds, self.start, self.done = label, seconds, time.monotonic(), 0

    def tick(self) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        if sys.stderr.isatty() or self.done % 200 == 0:
            filled = int(20 * min(1.0, elapsed / self.seconds))
            print(
                f"\r{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done} requests",
                end="",
                file=sys.stderr,
            )


async def closed_loop(
    one: Callable[[], Awaitable[Sample]], concurrency: int, seconds: float, label: str
) -> Report:
    samples: list[Sample] = []
    progress = Progress(label, seconds)
    end = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < end:
            samples.append(await one())
            progress.tick()

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    print(file=sys.stderr)
    return summarize(samples, time.perf_counter() - start)


async def open_loop(one: Callable[[], Awaitable[Sample]], rate: float, seconds: float, label: str) -> Report:
    samples: list[Sample] = []
    progress = Progress(label, seconds)
    rng = random.Random(0)
    tasks: list[asyncio.Future[Sample]] = []

    def record(task: asyncio.Future[Sample]) -> None:
        samples.append(task.result())
        progress.tick()

    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        tasks.append(asyncio.ensure_future(one()))
        tasks[-1].add_done_callback(record)
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    print(file=sys.stderr)
    return summarize(samples, time.perf_counter() - start)


async def run(args: argparse.Namespace) -> Report:
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        req = request(args.prompt_words, args.max_tokens)
        call = stream_once if not args.unary else unary_once

        def one() -> Awaitable[Sample]:
            return call(stub, req)

        if args.rate:
            return await open_loop(one, args.rate, args.seconds, f"rate {args.rate}/s")
        return await closed_loop(one, args.concurrency, args.seconds, f"{args.concurrency} streams")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--concurrency", type=int, default=16, help="closed loop: concurrent callers")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second (Poisson)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=16)
    parser.add_argument("--unary", action="store_true", help="ChatCompletion instead of StreamChatCompletion")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(json.dumps(asdict(report), indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(asdict(report), out, indent=2)


if __name__ == "__main__":
    main()
