"""Client processes of `make gpu-check`: streams against an OpenAI-compatible server or the gateway.

One process sends its share of the streams all at once and reports what it saw:

    python -m bench.gpu_clients {openai,grpc} TARGET MODEL --streams N --tokens T [--first I] [--ignore-eos]

It prints `ready` once it reached the target, waits for a line on stdin, then prints its
StreamTimes (bench/gpu_report.py) as one JSON line. `run_clients()` starts several, so that
no single Python client limits what a server can deliver, and merges their reports.
"""

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import grpc

from bench.gpu_report import StreamTimes, merge
from chat.v1 import chat_pb2, chat_pb2_grpc

TEMPERATURE = 1.0


def prompt(i: int) -> str:
    """Request i's message; the in-process driver renders the same text."""
    return f"Request {i}: write a long story about a lighthouse keeper and a storm."


@dataclass
class Stream:
    start: float = field(default_factory=time.perf_counter)
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""

    def arrived(self, text: str) -> None:
        if text:
            self.arrivals.append(time.perf_counter())


def collect(streams: list[Stream], expected: int, start: float, end: float) -> StreamTimes:
    """A stream counts in full or as an error: it must end with exactly `expected` tokens."""
    times = StreamTimes(start=start, end=end, requests=len(streams))
    for s in streams:
        if not s.error and s.tokens != expected:
            s.error = f"got {s.tokens} tokens, expected {expected}"
        if s.error:
            times.errors += 1
            if len(times.error_examples) < 5:
                times.error_examples.append(s.error[:200])
            continue
        times.tokens += s.tokens
        times.chunks += len(s.arrivals)
        if s.arrivals:
            times.ttft.append(s.arrivals[0] - s.start)
            times.itl += [b - a for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)]
    return times


async def openai_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], stream: Stream
) -> None:
    """POST .../chat/completions with stream=true; SSE events, one `data:` line each."""
    async with session.post(url, json=body) as response:
        if response.status != 200:
            stream.error = f"HTTP {response.status}: {(await response.text())[:150]}"
            return
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                stream.error = json.dumps(event["error"])[:150]
                return
            if event.get("choices"):
                stream.arrived(event["choices"][0].get("delta", {}).get("content") or "")
            if event.get("usage"):
                stream.tokens = event["usage"]["completion_tokens"]
    stream.error = stream.error or "stream ended without [DONE]"


async def run_openai(args: argparse.Namespace, ready: Callable[[], Awaitable[None]]) -> StreamTimes:
    base = args.target.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        async with session.get(base + "/models") as response:
            response.raise_for_status()
        await ready()

        async def one(i: int) -> Stream:
            body: dict[str, object] = {
                "model": args.model,
                "messages": [{"role": "user", "content": prompt(i)}],
                "max_tokens": args.tokens,
                "temperature": TEMPERATURE,
                "seed": i,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if args.ignore_eos:
                body["ignore_eos"] = True  # vLLM's extra parameter; the stack's worker sets it itself
            stream = Stream()
            try:
                await openai_stream(session, base + "/chat/completions", body, stream)
            except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
                stream.error = f"{type(exc).__name__}: {exc}"
            return stream

        start = time.time()
        streams = await asyncio.gather(*(one(args.first + i) for i in range(args.streams)))
        return collect(list(streams), args.tokens, start, time.time())


async def run_grpc(args: argparse.Namespace, ready: Callable[[], Awaitable[None]]) -> StreamTimes:
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await ready()

        async def one(i: int) -> Stream:
            request = chat_pb2.ChatCompletionRequest(
                model=args.model, max_tokens=args.tokens, temperature=TEMPERATURE, seed=i
            )
            request.messages.add(role="user", content=prompt(i))
            stream = Stream()
            try:
                async for chunk in stub.StreamChatCompletion(request, timeout=300):
                    if chunk.choices:
                        stream.arrived(chunk.choices[0].delta.content)
                    if chunk.HasField("usage"):
                        stream.tokens = chunk.usage.completion_tokens
            except grpc.aio.AioRpcError as exc:
                stream.error = f"{exc.code().name}: {exc.details()}"
            return stream

        start = time.time()
        streams = await asyncio.gather(*(one(args.first + i) for i in range(args.streams)))
        return collect(list(streams), args.tokens, start, time.time())


async def client_main(args: argparse.Namespace) -> None:
    async def ready() -> None:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the go signal: all clients start together

    run = run_openai if args.protocol == "openai" else run_grpc
    times = await run(args, ready)
    print(json.dumps(times.to_json()), flush=True)


def shares(streams: int, clients: int) -> list[int]:
    """Streams per client process, as even as possible; no process gets none."""
    clients = max(1, min(clients, streams))
    return [streams // clients + (1 if i < streams % clients else 0) for i in range(clients)]


async def run_clients(
    protocol: str,
    target: str,
    model: str,
    streams: int,
    tokens: int,
    clients: int,
    seconds: float,
    ignore_eos: bool = False,
) -> StreamTimes:
    """Starts the client processes, starts them together once all are ready, merges their reports."""
    processes: list[asyncio.subprocess.Process] = []
    first = 0
    for share in shares(streams, clients):
        command = [sys.executable, "-m", "bench.gpu_clients", protocol, target, model]
        command += ["--streams", str(share), "--tokens", str(tokens), "--first", str(first)]
        command += ["--ignore-eos"] if ignore_eos else []
        first += share
        processes.append(
            await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
        )
    try:
        async with asyncio.timeout(seconds):
            for process in processes:
                assert process.stdout is not None
                line = await process.stdout.readline()
                if line.strip() != b"ready":
                    raise RuntimeError(f"a client process failed to start (exit {await process.wait()})")
            for process in processes:
                assert process.stdin is not None
                process.stdin.write(b"go\n")
                await process.stdin.drain()
            reports = []
            for process in processes:
                assert process.stdout is not None
                reports.append(StreamTimes.from_json(json.loads(await process.stdout.readline())))
                await process.wait()
        return merge(reports)
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("protocol", choices=("openai", "grpc"))
    parser.add_argument("target", help="openai: base URL ending in /v1; grpc: HOST:PORT")
    parser.add_argument("model")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of this process's first request")
    parser.add_argument("--ignore-eos", action="store_true")
    asyncio.run(client_main(parser.parse_args()))


if __name__ == "__main__":
    main()
