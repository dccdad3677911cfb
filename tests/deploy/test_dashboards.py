"""Dashboards and alerts against a real Prometheus scraping a real stack under load.

Starts redis-server, the gateway and a CPU worker with the real model, and Debian's
`prometheus` scraping both every second with the PrometheusRule's rules loaded; sends
traffic (completions, streams, invalid requests, cancels); then evaluates every query of
every dashboard panel and every alert through Prometheus' HTTP API. Renders one panel's
data to artifacts/dashboard-time-to-first-token.png.
"""

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from chat.v1 import chat_pb2_grpc
from devstack.redis_server import RedisServer, free_port
from tests.deploy.manifests import REPO
from tests.integration.stack import Stack, chat_request

DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = REPO / "deploy" / "components" / "monitoring" / "prometheusrule.yaml"
ARTIFACTS = REPO / "artifacts"
SUBSTITUTIONS = {"$model": ".*", "$__rate_interval": "1m", "${datasource}": ""}

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="needs Debian's prometheus package"
)


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": yaml.safe_load(RULES.read_text())["spec"]["groups"]}))
    return path


@pytest.fixture(scope="module")
def loaded_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, rules_file: Path
) -> Iterator[Prometheus]:
    log_dir = tmp_path_factory.mktemp("dashboard-logs")
    stack = Stack(redis_server, log_dir, worker_env={"WORKER_MAX_CONCURRENCY": "4"})
    prometheus_port = free_port()
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        stack.start_gateway()
        stack.start_worker()
        stack.wait_worker_ready()
        config = log_dir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules_file)],
                    "scrape_configs": [
                        {
                            "job_name": "chat-gateway",
                            "static_configs": [{"targets": [f"127.0.0.1:{stack.gateway_metrics_port}"]}],
                        },
                        {
                            "job_name": "chat-worker",
                            "static_configs": [{"targets": [f"127.0.0.1:{stack.worker_metrics_ports[0]}"]}],
                        },
                    ],
                }
            )
        )
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={log_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(log_dir / "prometheus.log", "wb"),  # noqa: SIM115 - handed to the child
        )
        client = Prometheus(prometheus_port)
        _wait_ready(client)
        asyncio.run(_load(stack.address, seconds=20))
        time.sleep(3)  # a few more scrapes and rule evaluations
        yield client
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=10)
        stack.stop()


def _wait_ready(client: Prometheus) -> None:
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"{client.url}/-/ready", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("prometheus did not become ready")


async def _load(address: str, seconds: float) -> None:
    """Completions and streams, plus invalid and cancelled calls, for the error panels."""
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def client(i: int) -> None:
            while time.monotonic() < end:
                try:
                    if i == 0:
                        await stub.ChatCompletion(chat_request(temperature=9.0))  # refused: invalid
                        await asyncio.sleep(0.5)
                    elif i == 1:
                        call = stub.StreamChatCompletion(chat_request("Tell me a story.", max_tokens=200))
                        await call.read()
                        await call.read()
                        call.cancel()
                    else:
                        async for _ in stub.StreamChatCompletion(chat_request(f"Say {i}.", max_tokens=8)):
                            pass
                except grpc.aio.AioRpcError:
                    pass

        await asyncio.gather(*(client(i) for i in range(5)))


def _panel_queries() -> list[tuple[str, str, str]]:
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in SUBSTITUTIONS.items():
                    expr = expr.replace(variable, value)
                queries.append((path.stem, panel["title"], expr))
    return queries


def test_the_dashboards_are_generated_from_generate_py(tmp_path: Path) -> None:
    before = {p.name: p.read_text() for p in DASHBOARDS}
    subprocess.run(["python", str(REPO / "deploy" / "grafana" / "generate.py")], check=True)
    assert {p.name: p.read_text() for p in DASHBOARDS} == before, "run deploy/grafana/generate.py and commit"


def test_every_panel_query_returns_data(loaded_stack: Prometheus) -> None:
    empty = [
        f"{board} / {title}: {expr}"
        for board, title, expr in _panel_queries()
        if not loaded_stack.query(expr)
    ]
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_alert_rules_load_and_their_metrics_exist(loaded_stack: Prometheus, rules_file: Path) -> None:
    subprocess.run(["promtool", "check", "rules", str(rules_file)], check=True, capture_output=True)
    groups = loaded_stack.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["name"] for r in rules} == {
        "ChatHighErrorRate",
        "ChatQueueBacklogGrowing",
        "ChatNoLiveWorkers",
        "ChatTimeToFirstTokenSlow",
        "ChatDeadLetters",
    }
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    for name in sorted({m for r in rules for m in re.findall(r"\bchat_[a-z_]+", r["query"])}):
        assert loaded_stack.query(f'count({{__name__="{name}"}})'), (
            f"alert uses {name}, which no target exports"
        )


def test_render_the_time_to_first_token_panel(loaded_stack: Prometheus) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    [(_, title, _)] = [q for q in _panel_queries() if q[1] == "Time to first token by service tier"][:1]
    panel = next(
        p
        for p in json.loads((REPO / "deploy/grafana/dashboards/overview.json").read_text())["panels"]
        if p["title"] == title
    )
    end = time.time()
    fig, ax = plt.subplots(figsize=(8, 4))
    for target in panel["targets"]:
        expr = target["expr"].replace("$model", ".*").replace("$__rate_interval", "10s")
        data = loaded_stack.get("/api/v1/query_range", query=expr, start=end - 40, end=end, step=1)["result"]
        assert data, expr
        times, values = zip(*((float(t) - end, float(v)) for t, v in data[0]["values"]), strict=True)
        ax.plot(times, values, label=target["legendFormat"])
    ax.set(
        title=f"{title} (chat_gateway_time_to_first_token_seconds)", xlabel="seconds before now", ylabel="s"
    )
    ax.legend()
    ARTIFACTS.mkdir(exist_ok=True)
    out = ARTIFACTS / "dashboard-time-to-first-token.png"
    fig.savefig(out, dpi=100)
    assert out.stat().st_size > 10_000
