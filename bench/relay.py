"""`make bench`: what the relay (gateway -> Redis -> worker -> Redis -> gateway) costs.

The same closed-loop load, one after the other in one run, against:
  (a) engine   the benchmark engine called in-process (no gRPC, no Redis)
  (b) bare     a bare grpc.aio streaming server in front of the engine (bench/bare_server.py)
  (c) stack    the full stack: gateway, Redis, a worker on the benchmark engine
Scenarios: a concurrency sweep at 20 tokens/s per stream, 128 streams at 50 tokens/s, and
the engine flat out. Reports medians over repeats, the ratios (c)/(a) and (c)/(b), the
gateway's CPU per relayed token and Redis' CPU, and writes docs/benchmarks/relay.md,
docs/benchmarks/relay.json and docs/benchmarks/relay.png.

    .venv/bin/python -m bench.relay [--repeats 3] [--seconds 5] [--quick]
"""

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import psutil
import redis
import uvloop

from bench.loadgen import Sample, closed_loop, request, stream_once
from chat.v1 import chat_pb2_grpc
from common.models import ModelSpec
from devstack import processes
from devstack.local_stack import LocalStack
from devstack.redis_server import free_port
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.bench import BenchEngine

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks"
SPEC = ModelSpec("SmolLM2-135M-Instruct", REPO)
STREAMS_PER_CHANNEL = 100


async def engine_once(engine: BenchEngine, max_tokens: int, n: list[int]) -> Sample:
    sample = Sample()
    n[0] += 1
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    async for delta in engine.generate(GenerationRequest(f"e{n[0]}", [1], params)):
        sample.arrived(delta.text)
    sample.done()
    return sample


class Target:
    """A gRPC target to load: the bare server or the full stack."""

    def __init__(self, kind: str, tokens_per_second: float, tmp: Path) -> None:
        self.kind = kind
        self._bare: subprocess.Popen[bytes] | None = None
        self._stack: LocalStack | None = None
        if kind == "bare":
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            self._bare = subprocess.Popen(
                [sys.executable, "-m", "bench.bare_server", str(port), str(tokens_per_second)],
                cwd=REPO,
                stdout=subprocess.PIPE,
            )
            assert self._bare.stdout is not None and self._bare.stdout.readline().strip() == b"ready"
            return
        directory = tmp / "stack"
        directory.mkdir(exist_ok=True)
        env = {
            "WORKER_ENGINE": "bench",
            "WORKER_BENCH_TOKENS_PER_SECOND": str(tokens_per_second),
            "WORKER_MAX_CONCURRENCY": "2000",
            "GATEWAY_MAX_QUEUED_JOBS": "100000",
        }
        self._stack = LocalStack(directory, env).start()
        self.address = self._stack.address

    def cpu_seconds(self) -> dict[str, float]:
        """CPU used so far by the gateway process and by redis-server."""
        if self._stack is None or self._stack.gateway is None:
            return {}
        gateway = psutil.Process(self._stack.gateway.pid).cpu_times()
        info = redis.Redis.from_url(self._stack.redis.url).info("cpu")
        return {
            "gateway": gateway.user + gateway.system,
            "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        }

    def stop(self) -> None:
        if self._bare is not None:
            processes.stop(self._bare)
        if self._stack is not None:
            self._stack.stop()


async def measure(
    target: Target | None, engine: BenchEngine, concurrency: int, seconds: float, max_tokens: int
) -> dict[str, Any]:
    label = f"{target.kind if target else 'engine'} x{concurrency}"
    if target is None:
        counter = [0]
        report = await closed_loop(
            lambda: engine_once(engine, max_tokens, counter), concurrency, seconds, label
        )
        return asdict(report)
    # Like a fleet of callers: at most STREAMS_PER_CHANNEL streams share one HTTP/2 connection.
    address = target.address
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # else channels share one TCP connection
    channels = [
        grpc.aio.insecure_channel(address, options=own_connection)
        for _ in range(-(-concurrency // STREAMS_PER_CHANNEL))
    ]
    stubs = itertools.cycle([chat_pb2_grpc.ChatServiceStub(c) for c in channels])
    try:
        req = request(16, max_tokens)
        await stream_once(next(stubs), request(1, 1))  # warm the worker
        before = target.cpu_seconds()
        report = await closed_loop(lambda: stream_once(next(stubs), req), concurrency, seconds, label)
        after = target.cpu_seconds()
    finally:
        for channel in channels:
            await channel.close()
    result = asdict(report)
    if before:
        tokens = report.output_tokens_per_second * report.seconds
        result["gateway_us_per_token"] = round(
            (after["gateway"] - before["gateway"]) / max(tokens, 1) * 1e6, 1
        )
        result["redis_cores"] = round((after["redis"] - before["redis"]) / report.seconds, 3)
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise median of repeated runs."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if key in ("error_kinds", "error_examples"):
            continue
        if isinstance(value, dict) and all(isinstance(v, float | int) for v in value.values()):
            out[key] = {k: statistics.median(r[key][k] for r in runs) for k in value}
        elif isinstance(value, float | int):
            out[key] = statistics.median(r[key] for r in runs)
        else:
            out[key] = value
    out["errors"] = max(r["errors"] for r in runs)
    kinds = {k for r in runs for k in r["error_kinds"]}
    out["error_kinds"] = {k: sum(r["error_kinds"].get(k, 0) for r in runs) for k in kinds}
    out["error_examples"] = sorted({e for r in runs for e in r["error_examples"]})[:5]
    return out


SCENARIOS = {
    "sweep at 20 tok/s per stream": (20.0, 40, [1, 16, 128, 512, 1000]),
    "128 streams at 50 tok/s": (50.0, 100, [128]),
    "engine flat out": (0.0, 256, [128]),
}


async def run(repeats: int, seconds: float, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name, (tps, max_tokens, sweep) in SCENARIOS.items():
            sweep = sweep[:2] if quick else sweep
            engine = BenchEngine(SPEC, tps)
            targets = {"bare": Target("bare", tps, tmp), "stack": Target("stack", tps, tmp)}
            try:
                for concurrency in sweep:
                    row = {}
                    for mode in ("engine", "bare", "stack"):
                        runs = [
                            await measure(targets.get(mode), engine, concurrency, seconds, max_tokens)
                            for _ in range(repeats)
                        ]
                        row[mode] = median_run(runs)
                    results[f"{name} | {concurrency}"] = row
                    print(json.dumps({name: {concurrency: {m: _brief(row[m]) for m in row}}}), flush=True)
            finally:
                for target in targets.values():
                    target.stop()
    return results


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "tok/s": r["output_tokens_per_second"],
        "ttft_p50": r["ttft_ms"]["p50"],
        "itl_p50": r["itl_ms"]["p50"],
        "errors": r["errors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--quick", action="store_true", help="only the first two concurrencies of each scenario"
    )
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = uvloop.run(run(args.repeats, args.seconds, args.quick))
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": started,
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores,"
        f" {psutil.virtual_memory().total // 2**30} GiB",
        "command": "make bench  (.venv/bin/python -m bench.relay " + " ".join(sys.argv[1:]) + ")",
        "repeats": args.repeats,
        "seconds_per_run": args.seconds,
    }
    (OUT / "relay.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    from bench.report import write_markdown, write_plot

    write_plot(results, OUT / "relay.png")
    write_markdown(meta, results, OUT / "relay.md")
    print(f"wrote {OUT / 'relay.md'}")


if __name__ == "__main__":
    main()
