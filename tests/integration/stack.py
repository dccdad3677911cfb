"""A running stack for integration tests: real redis-server, gateway and worker processes."""

import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any, Protocol

import grpc
import redis
from prometheus_client.parser import text_string_to_metric_families

from chat.v1 import chat_pb2, chat_pb2_grpc
from common import keys
from devstack import processes
from devstack.redis_server import free_port

MODEL = "SmolLM2-135M-Instruct"
# The reference's examples name these models; the gateway maps them onto the served one.
REFERENCE_ALIASES = f"mixtral-8x7b-32768={MODEL},llama3-8b-8192={MODEL},llama3-70b-8192={MODEL}"


class RedisEndpoint(Protocol):
    """What the stack needs of its Redis: the REDIS_URL that reaches it (a RedisServer, a
    RedisSentinel topology)."""

    @property
    def url(self) -> str: ...


@dataclass
class Stack:
    redis_server: RedisEndpoint
    log_dir: Path
    gateway_env: dict[str, str] = field(default_factory=dict)
    worker_env: dict[str, str] = field(default_factory=dict)
    gateway: Popen[bytes] | None = None
    workers: list[Popen[bytes]] = field(default_factory=list)
    worker_metrics_ports: list[int] = field(default_factory=list)
    port: int = 0
    http_port: int = 0  # the Groq/OpenAI-compatible HTTP API
    gateway_metrics_port: int = 0
    credentials: grpc.ChannelCredentials | None = None  # for a gateway that serves TLS

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP API (append /openai/v1 for the groq SDK, /v1 for the openai SDK)."""
        scheme = "https" if self.credentials is not None else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def start_gateway(self) -> None:
        self.port = self.port or free_port()
        self.http_port = self.http_port or free_port()
        self.gateway_metrics_port = self.gateway_metrics_port or free_port()
        env = {
            "REDIS_URL": self.redis_server.url,
            "GATEWAY_ADDRESS": self.address,
            "GATEWAY_HTTP_ADDRESS": f"127.0.0.1:{self.http_port}",
            "GATEWAY_METRICS_PORT": str(self.gateway_metrics_port),
            "GATEWAY_MODEL_ALIASES": REFERENCE_ALIASES,
            # Tests start workers after the gateway (vLLM takes longer than the refusal grace to
            # start) or queue jobs with no worker on purpose; tests of the refusal set `refuse`.
            "GATEWAY_NO_WORKER": "queue",
            # A dropped stream's job waits this long for a resume before it is cancelled: short,
            # so that tests of cancellation on disconnect see it within their bounds.
            "GATEWAY_RESUME_GRACE_SECONDS": "2",
            **self.gateway_env,
        }
        self.gateway = processes.launch("gateway", env, self.log_dir / "gateway.log")
        processes.wait_serving(self.address, self.gateway, credentials=self.credentials)

    def start_worker(self, **extra_env: str) -> Popen[bytes]:
        """Starts a worker named worker-N (its consumer name in Redis and its log file)."""
        name = f"worker-{len(self.workers)}"
        port = free_port()
        env = {
            "REDIS_URL": self.redis_server.url,
            "WORKER_ID": name,
            "WORKER_METRICS_PORT": str(port),
            **self.worker_env,
            **extra_env,
        }
        worker = processes.launch("worker", env, self.log_dir / f"{name}.log")
        self.workers.append(worker)
        self.worker_metrics_ports.append(port)
        return worker

    def wait_worker_ready(self, timeout: float = 180.0) -> None:
        """A first one-token completion proves a worker has loaded the model and takes jobs."""
        with grpc.insecure_channel(self.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            request = chat_pb2.ChatCompletionRequest(
                model=MODEL, messages=[chat_pb2.ChatMessage(role="user", content="hi")], max_tokens=1
            )
            stub.ChatCompletion(request, timeout=timeout)

    def wait_context_window(self, tokens: int, timeout: float = 5.0) -> None:
        """Gateways learn a worker's context window within a second of it starting (ListModels shows it)."""
        end = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            while (window := stub.ListModels(chat_pb2.ListModelsRequest()).data[0].context_window) != tokens:
                assert time.monotonic() < end, f"gateway still reports a context window of {window}"
                time.sleep(0.1)

    def stop(self) -> None:
        for process in [*self.workers, self.gateway]:
            if process is not None:
                processes.stop(process)


def print_log_tails(log_dir: Path, lines: int = 12) -> None:
    """The last lines of every process's log, for a failed test's report."""
    for log in sorted(log_dir.glob("*.log")):
        print(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text().splitlines()[-lines:]))


def assert_nothing_leaked(client: redis.Redis, worker_ports: list[int], timeout: float = 10.0) -> None:
    """No queued or pending jobs, no cancel flags, no active engine requests; waits for jobs ending."""
    end = time.monotonic() + timeout
    while True:
        problems = leaks(client) + [
            f"worker on metrics port {port} has {n:.0f} active engine requests"
            for port in worker_ports
            if (n := running_requests(port))
        ]
        if not problems or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert not problems, problems


def leaks(client: redis.Redis) -> list[str]:
    problems = []
    for stream in sorted(k.decode() for k in client.scan_iter(f"{keys.PREFIX}:jobs:*")):
        if (n := client.xlen(stream)) != 0:
            problems.append(f"{n} jobs left in {stream}")
        try:
            pending = client.xpending(stream, keys.WORKER_GROUP)["pending"]
        except redis.ResponseError:  # no worker has created the group yet
            pending = 0
        if pending:
            problems.append(f"{pending} pending jobs in {stream}")
    for key in client.scan_iter(f"{keys.PREFIX}:*"):
        name = key.decode()
        # Job streams, reply streams and the engine registry live as long as their processes;
        # idempotency keys of finished calls (chat_client sends one per call) and completion logs
        # for their windows; a completion's lease for a moment. Each of those must expire.
        if name.startswith(f"{keys.PREFIX}:idempotency:"):
            if not client.hexists(key, "kept"):
                problems.append(f"idempotency key neither kept nor given up: {name}")
        elif name.startswith(
            tuple(f"{keys.PREFIX}:{kind}:" for kind in ("completion", "watched", "prefix", "conversations"))
        ):
            if client.pttl(key) < 0:
                problems.append(f"completion log, lease or placement record that never expires: {name}")
        elif not name.startswith(
            tuple(f"{keys.PREFIX}:{kind}:" for kind in ("jobs", "replies", "engines", "workerstreams"))
        ):
            problems.append(f"stray key {name}")
    return problems


def running_requests(port: int) -> float:
    """The worker's engine active-request gauge; 0 when the worker is not running."""
    try:
        samples = scrape(port)
    except OSError:
        return 0.0
    return sum(v for k, v in samples.items() if k.startswith("chat_worker_running_requests{"))


def job_streams_of(client: redis.Redis, model: str = MODEL) -> list[str]:
    """Every job stream of the model: its shards' and its workers' own (gateway/placement.py)."""
    return sorted(k.decode() for k in client.scan_iter(f"{keys.PREFIX}:jobs:{{{model}#*"))


def pending_jobs(client: redis.Redis, model: str = MODEL) -> list[dict[str, Any]]:
    """The model's delivered, unfinished jobs on all its streams (XPENDING entries: consumer,
    message_id, times_delivered, ...), each with its `stream`."""
    pending: list[dict[str, Any]] = []
    for stream in job_streams_of(client, model):
        try:
            entries = client.xpending_range(stream, keys.WORKER_GROUP, "-", "+", 100)
        except redis.ResponseError:  # no group yet
            continue
        pending += [{**entry, "stream": stream} for entry in entries]
    return pending


def jobs_ever_queued(client: redis.Redis) -> int:
    """How many entries were ever added to the model's job stream (survives XDEL)."""
    stream = keys.job_stream(MODEL)
    if not client.exists(stream):
        return 0
    return int(client.xinfo_stream(stream)["entries-added"])


def scrape(port: int) -> dict[str, float]:
    """A process's metrics as {'name{label="v",...}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def chat_request(content: str = "Say hello.", **fields: object) -> chat_pb2.ChatCompletionRequest:
    """A request for the test model with one user message; fields override or add."""
    request = chat_pb2.ChatCompletionRequest(model=MODEL)
    request.messages.add(role="user", content=content)
    for name, value in fields.items():
        if name == "stop":
            request.stop.extend(value)  # type: ignore[call-overload]
        elif name == "response_format":
            request.response_format.type = str(value)
        elif name == "messages":
            del request.messages[:]
            request.messages.extend(value)  # type: ignore[call-overload]
        else:
            setattr(request, name, value)
    return request


def stream_text(chunks: list[chat_pb2.ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content for c in chunks)
