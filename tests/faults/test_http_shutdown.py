"""SIGTERM with an HTTP stream open: it finishes, then the gateway exits 0 (HTTP shares the drain)."""

import json
import signal

import httpx
import redis

from tests.faults.conftest import bench_text, check_clean
from tests.faults.helpers import started
from tests.integration.stack import MODEL, Stack


def test_gateway_sigterm_lets_open_http_streams_finish(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    started(fault_stack, workers=1)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
    text = ""
    with (
        httpx.Client(base_url=fault_stack.http_url, timeout=30) as client,
        client.stream("POST", "/openai/v1/chat/completions", json=body) as response,
    ):
        events: list[str] = []
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line)
            if len(events) == 3:  # mid-stream
                assert fault_stack.gateway is not None
                fault_stack.gateway.send_signal(signal.SIGTERM)
            if line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    assert events[-1] == "data: [DONE]" and text == bench_text(40)
    assert fault_stack.gateway is not None and fault_stack.gateway.wait(timeout=15) == 0
    check_clean(fault_stack, fault_redis_client)
