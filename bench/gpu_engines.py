"""The engines of `make gpu-check`'s modes (a) and (b), and the child processes that run them.

(a) is `python -m bench.gpu_check engine`: the engine the worker would build from the WORKER_*
settings, driven in-process. (b) is vLLM's OpenAI server started with (a)'s engine arguments.
Each runs in its own process group, so that stopping it also stops vLLM's engine process.
"""

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

from bench.gpu_clients import TEMPERATURE, Stream, collect, prompt
from common.models import ModelSpec
from devstack.redis_server import free_port


def vllm_engine_args(engine: Any = None) -> dict[str, Any]:
    """What (a) and the worker pass vLLM beyond the WORKER_* settings; (b) gets the same."""
    if engine is None:
        from worker.config import WorkerSettings
        from worker.engine.vllm import VllmEngine

        settings = WorkerSettings.from_env()
        engine = VllmEngine(settings.model, settings.vllm, settings.max_concurrency)
    a = engine.engine_args()
    return {
        "dtype": a.dtype,
        "enforce_eager": a.enforce_eager,
        "kv_cache_memory_bytes": a.kv_cache_memory_bytes,
    }


async def drive_engine(streams: int, tokens: int) -> dict[str, Any]:
    """Mode (a), in this process: the engine the worker would build, all streams at once."""
    from common.models import Message, PromptRenderer
    from worker.config import WorkerSettings
    from worker.engine.base import Engine, GenerationRequest, SamplingParams
    from worker.engine.bench import BenchEngine

    settings = WorkerSettings.from_env()
    engine: Engine
    engine_args: dict[str, Any] = {}
    if settings.engine == "bench":
        engine = BenchEngine(settings.model, settings.bench_tokens_per_second)
    else:
        from worker.engine.vllm import VllmEngine

        engine = VllmEngine(settings.model, settings.vllm, settings.max_concurrency)
        engine_args = vllm_engine_args(engine)
    started = time.monotonic()
    await engine.start()
    startup = time.monotonic() - started
    renderer = PromptRenderer(settings.model)

    async def one(i: int, max_tokens: int) -> Stream:
        stream = Stream()
        ids = renderer.render([Message("user", prompt(i))])
        params = SamplingParams(temperature=TEMPERATURE, max_tokens=max_tokens, seed=i)
        async for delta in engine.generate(GenerationRequest(f"gpu-check-{i}-{max_tokens}", ids, params)):
            stream.arrived(delta.text)
            stream.tokens = delta.completion_tokens
        return stream

    try:
        await asyncio.gather(*(one(10**6 + i, 16) for i in range(16)))  # warm-up, not measured
        start = time.time()
        measured = await asyncio.gather(*(one(i, tokens) for i in range(streams)))
        times = collect(list(measured), tokens, start, time.time())
    finally:
        await engine.stop()
    return {"times": times.to_json(), "engine_args": engine_args, "startup_seconds": round(startup, 1)}


def _append(log: Path) -> BinaryIO:
    return open(log, "ab")  # the caller hands it to a child process


async def run_child(command: list[str], env: dict[str, str], log: Path) -> None:
    """Runs a command in its own process group, output to log; the whole group dies with it."""
    with _append(log) as output:
        process = await asyncio.create_subprocess_exec(
            *command, env={**os.environ, **env}, stdout=output, stderr=output, start_new_session=True
        )
        try:
            await process.wait()
        finally:
            kill_group(process.pid)  # also what it left running, or all of it when cancelled
            await process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"exited with {process.returncode}; see {log}")


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class VllmServer:
    """Mode (b): `python -m vllm.entrypoints.openai.api_server` with (a)'s engine arguments."""

    def __init__(self, args: argparse.Namespace, engine_args: dict[str, Any], log: Path) -> None:
        self.port = free_port()
        spec = ModelSpec.parse(args.model)
        name, path = spec.name, str(spec.path)
        flags = [
            "--model", path, "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port),
            "--max-num-seqs", str(args.streams), "--max-model-len", str(args.max_model_len),
            "--gpu-memory-utilization", str(args.gpu_mem), "--load-format", args.load_format,
            "--dtype", str(engine_args.get("dtype", "auto")), "--seed", "0",
            "--disable-log-stats", "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if engine_args.get("enforce_eager"):
            flags.append("--enforce-eager")
        if engine_args.get("kv_cache_memory_bytes"):
            flags += ["--kv-cache-memory-bytes", str(engine_args["kv_cache_memory_bytes"])]
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *flags]
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with _append(self._log) as log:
            self._process = subprocess.Popen(self.command, stdout=log, stderr=log, start_new_session=True)

    async def wait_healthy(self) -> None:
        while self._process is not None and self._process.poll() is None:
            if await asyncio.to_thread(_answers, f"http://127.0.0.1:{self.port}/health"):
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"vLLM's server exited; see {self._log}")

    def stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(timeout=8)
            kill_group(self._process.pid)  # also its engine process
            self._process.wait()
            self._process = None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False
