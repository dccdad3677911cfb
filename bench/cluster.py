"""What Redis Cluster does to the relay: one redis-server vs a 3-primary cluster, side by side.

Two stacks run at once on this machine, each with GATEWAYS gateways, WORKERS workers on the
benchmark engine and REDIS_JOB_STREAMS=3: (a) on one redis-server, (b) on a Redis Cluster of 3
primaries (devstack/redis_cluster.py). The same closed-loop streaming load (bench/loadgen.py,
callers spread evenly over the gateways) goes through one stack, then the other, in alternating
order round after round (the shared machine is noisy: both meet the same noise), with a round
of the engine alone (bench/relay.py) in each repeat for the TTFT it adds.

Per topology: relayed tokens/s, TTFT and ITL, and the CPU of every redis-server process over the
round per 1,000 tokens relayed, per shard and in total, with each primary's share; gateways'
and workers' CPU per token too. The gateways' ids are picked so that their slots (reply stream,
progress records, completion logs: common/keys.py) are on two different primaries. Logs go to
.run/bench-cluster/; their warnings and errors are counted in the report.

Writes docs/benchmarks/cluster.md and docs/benchmarks/cluster.json.

    .venv/bin/python -m bench.cluster [--seconds 15] [--repeats 3] [--quick]
"""

import argparse
import itertools
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import redis
import uvloop

from bench.loadgen import closed_loop, request, stream_once
from bench.relay import OUT, REPO, SPEC, STREAMS_PER_CHANNEL, measure, median_run
from bench.relay import _brief as brief
from chat.v1 import chat_pb2_grpc
from common import keys
from devstack import processes
from devstack.redis_cluster import LocalRedisCluster
from devstack.redis_server import RedisServer, free_port
from worker.engine.bench import BenchEngine

LOGS = REPO / ".run" / "bench-cluster"

STREAMS = 64
TOKENS_PER_SECOND = 50.0  # per stream
MAX_TOKENS = 50  # one second per generation
GATEWAYS = 2
WORKERS = 2
JOB_STREAMS = 3
PRIMARIES = 3
TOPOLOGIES = ("single", "cluster")
TITLES = {"single": "(a) one redis-server", "cluster": f"(b) Redis Cluster, {PRIMARIES} primaries"}
# The project's own figure for one GPU worker (docs/gpu-check.md, H100 80GB, vLLM 0.26,
# llama-1b-shape): 17.1k tokens/s through vLLM's server, 26.4k from the engine in-process.
H100_WORKER_TOKENS_PER_SECOND = 17_100
H100_ENGINE_TOKENS_PER_SECOND = 26_400
SETTINGS = {
    "WORKER_ENGINE": "bench",
    "WORKER_BENCH_TOKENS_PER_SECOND": str(TOKENS_PER_SECOND),
    "WORKER_MAX_CONCURRENCY": "2000",
    "GATEWAY_MAX_QUEUED_JOBS": "100000",
    "GATEWAY_NO_WORKER": "queue",  # the warm-up waits for the workers to load
    "GATEWAY_METRICS_PORT": "0",
    "WORKER_METRICS_PORT": "0",
    "REDIS_JOB_STREAMS": str(JOB_STREAMS),
}
SCRIPTS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")
# Each channel its own TCP connection (else channels to one address share one).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Shard:
    """One redis-server that serves keys: its process and which of the stack's slots it holds."""

    label: str
    port: int
    pid: int
    holds: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def spread_gateway_ids(cluster: LocalRedisCluster, count: int) -> list[str]:
    """Gateway ids whose slots (common/keys.py gateway_tag) are on `count` different primaries."""
    ids: dict[int, str] = {}
    for i in itertools.count():
        gateway_id = f"bench-gateway-{i}"
        ids.setdefault(cluster.primary_for(keys.reply_stream(gateway_id)).port, gateway_id)
        if len(ids) == count:
            return list(ids.values())
    raise AssertionError("unreachable")


class Fleet:
    """GATEWAYS gateways and WORKERS workers on one Redis topology, logs in `directory`."""

    def __init__(self, kind: str, directory: Path, gateway_ids: list[str] | None = None) -> None:
        self.kind = kind
        self.directory = directory
        self.gateway_ids = gateway_ids or []
        self.cluster: LocalRedisCluster | None = None
        self.server: RedisServer | None = None
        self.gateways: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []
        self.shards: list[Shard] = []

    def start(self) -> "Fleet":
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            url = self._start_redis()
            for gateway_id in self.gateway_ids:
                self.addresses.append(address := f"127.0.0.1:{free_port()}")
                env = {"GATEWAY_ID": gateway_id, "GATEWAY_ADDRESS": address}
                env |= {"GATEWAY_HTTP_ADDRESS": f"127.0.0.1:{free_port()}"}
                log = self.directory / f"{gateway_id}.log"
                self.gateways.append(processes.launch("gateway", {**SETTINGS, "REDIS_URL": url, **env}, log))
            for address, gateway in zip(self.addresses, self.gateways, strict=True):
                processes.wait_serving(address, gateway)
            for i in range(WORKERS):
                env = {**SETTINGS, "REDIS_URL": url, "WORKER_ID": f"bench-worker-{i}"}
                self.workers.append(processes.launch("worker", env, self.directory / f"worker-{i}.log"))
        except BaseException:
            self.stop()
            raise
        return self

    def _start_redis(self) -> str:
        """Starts the topology; picks the gateway ids (cluster) and finds the shards. Its URL."""
        if self.kind == "single":
            self.server = RedisServer(self.directory / "redis")
            self.server.start()
            self.shards = [Shard("redis", self.server.port, self._pid(self.server.port), ["every key"])]
            return self.server.url
        self.cluster = LocalRedisCluster(self.directory / "redis", primaries=PRIMARIES)
        self.cluster.start()
        self.gateway_ids = self.gateway_ids or spread_gateway_ids(self.cluster, GATEWAYS)
        primaries = sorted(self.cluster.primaries(), key=lambda node: node.port)
        by_port = {
            node.port: Shard(f"shard {i + 1}", node.port, self._pid(node.port))
            for i, node in enumerate(primaries)
        }
        for gateway_id in self.gateway_ids:
            by_port[self.cluster.primary_for(keys.reply_stream(gateway_id)).port].holds.append(gateway_id)
        for n in range(JOB_STREAMS):
            by_port[self.cluster.primary_for(keys.job_stream(SPEC.name, n)).port].holds.append(f"jobs #{n}")
        self.shards = list(by_port.values())
        return self.cluster.url

    @staticmethod
    def _pid(port: int) -> int:
        with redis.Redis(port=port) as client:
            return int(client.info("server")["process_id"])

    def counters(self) -> dict[str, Any]:
        """CPU seconds of every process so far, and the commands each shard has run."""
        commands, scripts = {}, {}
        for shard in self.shards:
            with redis.Redis(port=shard.port) as client:
                # Commands that scripts run count too (one EVALSHA of 3 calls: 4).
                commands[shard.label] = float(client.info("stats")["total_commands_processed"])
                stats = client.info("commandstats")
                scripts[shard.label] = float(
                    sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in SCRIPTS)
                )
        return {
            "redis": {shard.label: cpu_seconds(shard.pid) for shard in self.shards},
            "commands": commands,
            "scripts": scripts,
            "gateways": sum(cpu_seconds(p.pid) for p in self.gateways),
            "workers": sum(cpu_seconds(p.pid) for p in self.workers),
        }

    def check_running(self) -> None:
        for process in (*self.gateways, *self.workers):
            if process.poll() is not None:
                raise RuntimeError(
                    f"{self.kind}: a process exited ({process.returncode}); see {self.directory}"
                )

    def stop(self) -> None:
        for process in (*self.workers, *self.gateways):
            processes.stop(process)
        self.workers, self.gateways = [], []
        if self.server is not None:
            self.server.stop()
        if self.cluster is not None:
            self.cluster.stop()


async def stack_round(fleet: Fleet, seconds: float, label: str) -> dict[str, Any]:
    """The load through the fleet's gateways (callers take them in turn) and what it cost."""
    fleet.check_running()
    per_gateway = -(-STREAMS // (GATEWAYS * STREAMS_PER_CHANNEL))
    channels = [
        grpc.aio.insecure_channel(address, options=OWN_CONNECTION)
        for _ in range(per_gateway)
        for address in fleet.addresses
    ]
    stubs = itertools.cycle([chat_pb2_grpc.ChatServiceStub(channel) for channel in channels])
    req = request(16, MAX_TOKENS)
    try:
        before = fleet.counters()
        report = await closed_loop(lambda: stream_once(next(stubs), req), STREAMS, seconds, label)
        after = fleet.counters()
    finally:
        for channel in channels:
            await channel.close()
    result = asdict(report)
    tokens = max(report.output_tokens_per_second * report.seconds, 1.0)
    redis_cpu = {shard: after["redis"][shard] - before["redis"][shard] for shard in before["redis"]}
    total = sum(redis_cpu.values())
    result["redis_ms_per_1k_tokens"] = {s: round(v / tokens * 1e6, 3) for s, v in redis_cpu.items()}
    result["redis_ms_per_1k_tokens_total"] = round(total / tokens * 1e6, 3)
    result["redis_share"] = {s: round(v / max(total, 1e-9), 3) for s, v in redis_cpu.items()}
    result["redis_cores"] = {s: round(v / report.seconds, 3) for s, v in redis_cpu.items()}
    result["redis_cores_total"] = round(total / report.seconds, 3)
    for name in ("commands", "scripts"):
        done = {s: after[name][s] - before[name][s] for s in before[name]}
        result[f"redis_{name}_per_1k_tokens"] = {s: round(v / tokens * 1000, 1) for s, v in done.items()}
    for side in ("gateways", "workers"):
        result[f"{side}_us_per_token"] = round((after[side] - before[side]) / tokens * 1e6, 1)
    return result


def log_problems(directory: Path, limit: int = 10) -> dict[str, dict[str, Any]]:
    """Warnings, errors and tracebacks in the gateways' and workers' logs: count and first lines."""
    found: dict[str, dict[str, Any]] = {}
    for log in sorted(directory.glob("*/*.log")):
        lines = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if any(mark in line for mark in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback"))
        ]
        if lines:
            found[str(log.relative_to(REPO))] = {"count": len(lines), "first": lines[:limit]}
    return found


async def run(repeats: int, seconds: float, warmup: float) -> dict[str, Any]:
    shutil.rmtree(LOGS, ignore_errors=True)
    fleets: dict[str, Fleet] = {}
    rounds: dict[str, list[dict[str, Any]]] = {"engine": [], "single": [], "cluster": []}
    engine = BenchEngine(SPEC, TOKENS_PER_SECOND)
    started = time.monotonic()
    try:
        fleets["cluster"] = Fleet("cluster", LOGS / "cluster").start()
        fleets["single"] = Fleet("single", LOGS / "single", fleets["cluster"].gateway_ids).start()
        print(f"stacks up in {time.monotonic() - started:.1f}s", file=sys.stderr)
        for kind in TOPOLOGIES:  # the first calls wait for the workers to load; not measured
            await stack_round(fleets[kind], warmup, f"warm-up {kind}")
        for r in range(repeats):
            rounds["engine"].append(await measure(None, engine, STREAMS, seconds, MAX_TOKENS))
            for kind in TOPOLOGIES if r % 2 == 0 else TOPOLOGIES[::-1]:
                rounds[kind].append(await stack_round(fleets[kind], seconds, f"{kind} #{r + 1}"))
                print(json.dumps({kind: _brief(rounds[kind][-1])}), flush=True)
    finally:
        for fleet in fleets.values():
            fleet.stop()
    shards = {kind: [asdict(shard) for shard in fleet.shards] for kind, fleet in fleets.items()}
    return {
        "medians": {kind: median_run(runs) for kind, runs in rounds.items()},
        "rounds": rounds,
        "shards": shards,
        "gateway_ids": fleets["cluster"].gateway_ids,
        "log_problems": log_problems(LOGS),
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {**brief(r), "redis ms/1k tok": r["redis_ms_per_1k_tokens_total"], "share": r["redis_share"]}


def _spread(runs: list[dict[str, Any]], value: str) -> str:
    values = [r[value] for r in runs]
    return f" ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else ""


def _topology_table(results: dict[str, Any]) -> list[str]:
    engine = results["medians"]["engine"]
    lines = [
        "| topology | tokens/s (range over rounds) | TTFT p50 / p99 ms | TTFT p50 over the engine's"
        " | ITL p50 / p99 ms | errors | Redis CPU ms per 1k tokens: total (per shard) | Redis cores"
        " | gateways µs/token | workers µs/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| engine in-process | {engine['output_tokens_per_second']:.0f}"
        f"{_spread(results['rounds']['engine'], 'output_tokens_per_second')} | "
        f"{engine['ttft_ms']['p50']:.1f} / {engine['ttft_ms']['p99']:.1f} | | "
        f"{engine['itl_ms']['p50']:.1f} / {engine['itl_ms']['p99']:.1f} | {engine['errors']} | | | | |",
    ]
    for kind in TOPOLOGIES:
        r = results["medians"][kind]
        per_shard = ", ".join(f"{v:.1f}" for v in r["redis_ms_per_1k_tokens"].values())
        lines.append(
            f"| {TITLES[kind]} | {r['output_tokens_per_second']:.0f}"
            f"{_spread(results['rounds'][kind], 'output_tokens_per_second')} | "
            f"{r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f} | "
            f"{r['ttft_ms']['p50'] - engine['ttft_ms']['p50']:+.1f} | "
            f"{r['itl_ms']['p50']:.1f} / {r['itl_ms']['p99']:.1f} | {r['errors']} | "
            f"{r['redis_ms_per_1k_tokens_total']:.1f} ({per_shard}) | {r['redis_cores_total']:.3f} | "
            f"{r['gateways_us_per_token']:.0f} | {r['workers_us_per_token']:.0f} |"
        )
    return lines


def _shard_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| topology | shard | holds the slots of | CPU share | Redis CPU ms per 1k tokens | cores"
        " | commands per 1k tokens (scripts' own included) | script calls per 1k tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in TOPOLOGIES:
        r = results["medians"][kind]
        for shard in results["shards"][kind]:
            s, holds = shard["label"], ", ".join(shard["holds"]) or "none of them"
            lines.append(
                f"| {TITLES[kind]} | {s} (:{shard['port']}) | {holds} | {r['redis_share'][s]:.0%} | "
                f"{r['redis_ms_per_1k_tokens'][s]:.1f} | {r['redis_cores'][s]:.3f} | "
                f"{r['redis_commands_per_1k_tokens'][s]:.0f} | {r['redis_scripts_per_1k_tokens'][s]:.0f} |"
            )
    return lines


def relay_flat_out() -> tuple[float, float] | None:
    """(tokens/s, Redis cores) of the full stack with the engine flat out in docs/benchmarks/relay.json."""
    try:
        stack = json.loads((OUT / "relay.json").read_text())["results"]["engine flat out | 128"]["stack"]
        return float(stack["output_tokens_per_second"]), float(stack["redis_cores"])
    except (OSError, KeyError, ValueError):
        return None


def _meaning(results: dict[str, Any]) -> list[str]:
    """What the figures say about capacity, computed from them (so a rerun keeps it true)."""
    single, cluster = results["medians"]["single"], results["medians"]["cluster"]
    engine_ttft = results["medians"]["engine"]["ttft_ms"]["p50"]
    cost = single["redis_ms_per_1k_tokens_total"]  # ms per 1k tokens = µs per token
    per_core = 1e6 / cost

    def workers(us_per_token: float, rate: float = H100_WORKER_TOKENS_PER_SECOND) -> float:
        return 1e6 / us_per_token / rate

    def commands(r: dict[str, Any]) -> float:
        return float(sum(r["redis_commands_per_1k_tokens"].values())) / 1000

    batch = 1000 / max(sum(single["redis_scripts_per_1k_tokens"].values()), 1e-9)
    shares = cluster["redis_share"]
    gateway_shards = [
        s["label"] for s in results["shards"]["cluster"] if any("gateway" in h for h in s["holds"])
    ]
    shard_cost = max(cluster["redis_ms_per_1k_tokens"][s] for s in gateway_shards) * GATEWAYS
    others = [s["label"] for s in results["shards"]["cluster"] if s["label"] not in gateway_shards]
    lines = [
        f"- Cost: one redis-server spent {cost:.1f} µs of CPU per relayed token, the cluster's shards "
        f"{cluster['redis_ms_per_1k_tokens_total']:.1f} µs together "
        f"({cluster['redis_ms_per_1k_tokens_total'] / cost:.2f}×), at "
        f"{single['output_tokens_per_second']:.0f} vs {cluster['output_tokens_per_second']:.0f} tokens/s, "
        "with TTFT p50 "
        f"{single['ttft_ms']['p50'] - engine_ttft:+.0f} vs {cluster['ttft_ms']['p50'] - engine_ttft:+.0f} ms "
        f"over the engine's. Both ran the same commands per token ({commands(single):.1f} vs "
        f"{commands(cluster):.1f}, scripts' own included): the cluster spent more CPU per command. Every "
        f"token is its own event here, about {batch:.0f} tokens per script call; fixed costs (idle workers "
        "polling the job streams, heartbeats) are included.",
        "- So one shard (Redis runs commands on one core) carries, at a full core, about "
        f"{per_core / 1000:.0f}k tokens/s at one redis-server's cost; a cluster shard spent "
        f"{shard_cost:.0f} µs per token of the gateway whose slot it holds (each gateway relayed "
        f"1/{GATEWAYS} of the tokens), so {1000 / shard_cost:.0f}k. That is {workers(shard_cost):.1f}-"
        f"{workers(cost):.1f} GPU workers per shard at the project's "
        f"{H100_WORKER_TOKENS_PER_SECOND / 1000:.1f}k tokens/s per H100 worker through vLLM's server "
        f"({workers(shard_cost, H100_ENGINE_TOKENS_PER_SECOND):.1f}-"
        f"{workers(cost, H100_ENGINE_TOKENS_PER_SECOND):.1f} at the engine's own "
        f"{H100_ENGINE_TOKENS_PER_SECOND / 1000:.1f}k; docs/gpu-check.md), half that to keep a shard at "
        f"half a core. A linear extrapolation from {single['redis_cores_total']:.2f} of a core on a shared "
        "2-core machine: an estimate.",
    ]
    if (flat := relay_flat_out()) is not None:
        flat_cost = flat[1] / flat[0] * 1e6
        lines.append(
            "- That capacity is a floor: with many events per script call the cost per token falls "
            f"(bench/relay.py, engine flat out: {flat[1]:.3f} cores at {flat[0]:.0f} tokens/s, "
            f"{flat_cost:.1f} µs per token, about {1e6 / flat_cost / H100_WORKER_TOKENS_PER_SECOND:.0f} "
            "GPU workers per core). A GPU worker's decode step hands the publisher a token for each of its "
            "streams at once, so its batches should be large; measure on a GPU before relying on it."
        )
    lines += [
        f"- Spread: the shards holding a gateway's slot ({', '.join(gateway_shards)}) took "
        f"{sum(shares[s] for s in gateway_shards):.0%} of the cluster's Redis CPU, "
        f"{' and '.join(format(shares[s], '.0%') for s in gateway_shards)}; the one(s) with job "
        f"streams only ({', '.join(others) or 'none'}) {sum(shares[s] for s in others):.0%}. "
        "Per-token writes (reply stream, progress record, completion log) go to the slot of the gateway "
        "that queued the job: they spread over shards with the gateways, and one gateway's tokens all "
        "land on one shard.",
        "- Scaling: relay capacity grows with shards as long as there are at least as many gateways as "
        "shards (more in practice: a gateway's tag lands on a shard by hash, so pick GATEWAY_IDs or run "
        "several per shard); job-stream traffic (per job, not per token) spreads with REDIS_JOB_STREAMS "
        f"(here {JOB_STREAMS}). A gateway needs {cluster['gateways_us_per_token']:.0f} µs of "
        "its own CPU per token here, several times Redis's, so deployments run many gateways anyway.",
    ]
    return lines


def write_markdown(meta: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    problems = results["log_problems"]
    lines = [
        "# Benchmarks: one redis-server vs Redis Cluster",
        "",
        "Generated by `make bench` (bench/cluster.py); do not edit by hand.",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']} (shared and noisy: compare the rows of one run, not across runs)",
        f"- command: `{meta['command']}`",
        f"- load: {STREAMS} concurrent streams, closed loop, {MAX_TOKENS} tokens each at "
        f"{TOKENS_PER_SECOND:.0f} tokens/s (the benchmark engine, `WORKER_ENGINE=bench`); callers spread "
        "evenly over the gateways",
        f"- each stack: {GATEWAYS} gateways, {WORKERS} workers, REDIS_JOB_STREAMS={JOB_STREAMS}; the "
        "gateways' ids were picked so that their slots are on different primaries "
        f"({', '.join(results['gateway_ids'])}); the cluster has no replicas",
        f"- each figure is the median of {meta['repeats']} rounds of {meta['seconds_per_round']} s per "
        "topology, the topologies taking turns (a, b, then b, a, ...) while both stacks run, and an engine "
        "round in each repeat; the load generator, gateways, workers and every redis-server share the "
        "same cores",
        "- Redis CPU: user + system CPU of each redis-server process over the round (psutil) divided by "
        "the tokens relayed in it; ms per 1,000 tokens is µs per token",
        "",
        "## Per topology",
        "",
        *_topology_table(results),
        "",
        "## Per shard",
        "",
        *_shard_table(results),
        "",
        "## Logs",
        "",
        "Warnings and errors in the gateways' and workers' logs: "
        + (
            "none."
            if not problems
            else "; ".join(
                f"{name}: {p['count']} lines, first `{p['first'][0]}`" for name, p in problems.items()
            )
        ),
        "",
        "## What it means",
        "",
        *_meaning(results),
    ]
    path.write_text("\n".join(lines) + "\n")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    memory = psutil.virtual_memory().total // 2**30
    return f"{platform.platform()}, {cpu}, {psutil.cpu_count()} cores, {memory} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="length of one round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per topology")
    parser.add_argument("--quick", action="store_true", help="one round of 5 s per topology")
    args = parser.parse_args()
    repeats, seconds = (1, 5.0) if args.quick else (args.repeats, args.seconds)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = uvloop.run(run(repeats, seconds, warmup=2.0 if args.quick else 4.0))
    meta = {
        "date": date,
        "machine": machine(),
        "command": "make bench  (.venv/bin/python -m bench.cluster " + " ".join(sys.argv[1:]) + ")",
        "repeats": repeats,
        "seconds_per_round": seconds,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cluster.json").write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    write_markdown(meta, results, OUT / "cluster.md")
    if results["log_problems"]:
        print(json.dumps(results["log_problems"], indent=2), file=sys.stderr)
    print(f"wrote {OUT / 'cluster.md'} in {results['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
