"""Writes the Grafana dashboards (dashboards/*.json) from the panel list below.

    .venv/bin/python deploy/grafana/generate.py

Every query uses the `datasource` and `model` variables; tests/deploy checks each one
against a real Prometheus scraping a running stack. Edit here, then regenerate.
"""

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards"
M = 'model=~"$model"'
RATE = "$__rate_interval"


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    return [
        (
            f"p{q}" + (f" {{{{{by}}}}}" if by else ""),
            f"histogram_quantile(0.{q}, sum by ({group}) (rate({metric}_bucket{{{M}}}[{RATE}])))",
        )
        for q in ("50", "95", "99")
    ]


# On both dashboards: what cache-affine placement (gateway/placement.py) is for.
PREFIX_CACHE_HIT_RATE = (
    "Prefix cache hit rate per worker (prompt tokens found cached)",
    "percentunit",
    [
        (
            "{{instance}}",
            f"sum by (instance) (rate(chat_worker_prefix_cache_hits_total{{{M}}}[{RATE}]))"
            " / clamp_min(sum by (instance)"
            f" (rate(chat_worker_prefix_cache_queries_total{{{M}}}[{RATE}])), 1)",
        )
    ],
)

OVERVIEW = [
    (
        "Requests per second by transport and RPC",
        "reqps",
        [
            (
                "{{transport}} {{rpc}}",
                f"sum by (transport, rpc) (rate(chat_gateway_requests_total{{{M}}}[{RATE}]))",
            )
        ],
    ),
    (
        "Errors per second by status code",
        "reqps",
        [("{{code}}", f'sum by (code) (rate(chat_gateway_requests_total{{{M}, code!="OK"}}[{RATE}]))')],
    ),
    (
        "Time to first token by service tier",
        "s",
        quantiles("chat_gateway_time_to_first_token_seconds", "service_tier"),
    ),
    ("Inter-token latency", "s", quantiles("chat_gateway_inter_token_latency_seconds")),
    (
        "Tokens per second",
        "short",
        [
            ("completion", f"sum(rate(chat_gateway_completion_tokens_total{{{M}}}[{RATE}]))"),
            ("prompt", f"sum(rate(chat_gateway_prompt_tokens_total{{{M}}}[{RATE}]))"),
        ],
    ),
    ("End-to-end latency by transport", "s", quantiles("chat_gateway_request_duration_seconds", "transport")),
    (
        "Queue depth (jobs waiting)",
        "short",
        [
            ("{{model}}", f"max by (model) (chat_gateway_queue_depth{{{M}}})"),
            ("{{model}} flex", f"max by (model) (chat_gateway_flex_queue_depth{{{M}}})"),
        ],
    ),
    ("Queue wait by service tier", "s", quantiles("chat_gateway_queue_wait_seconds", "service_tier")),
    (
        "Worker utilization (running / capacity)",
        "percentunit",
        [
            (
                "utilization",
                f"sum(chat_worker_running_requests{{{M}}})"
                f" / clamp_min(sum(chat_worker_running_requests{{{M}}})"
                f" + sum(chat_worker_free_slots{{{M}}}), 1)",
            )
        ],
    ),
    (
        "KV cache usage",
        "percentunit",
        [("{{instance}}", f"max by (instance) (chat_worker_kv_cache_usage_ratio{{{M}}})")],
    ),
    (
        "Rejections per second by reason",
        "reqps",
        [("{{reason}}", f"sum by (reason) (rate(chat_gateway_rejections_total{{{M}}}[{RATE}]))")],
    ),
    (
        "Open calls and Redis",
        "short",
        [
            ("open calls", "sum(chat_gateway_open_calls)"),
            ("gateways reaching Redis", "sum(chat_gateway_redis_up)"),
        ],
    ),
    (
        "Cache-affine placements per second by outcome",
        "reqps",
        [("{{outcome}}", f"sum by (outcome) (rate(chat_gateway_placements_total{{{M}}}[{RATE}]))")],
    ),
    PREFIX_CACHE_HIT_RATE,
]

WORKER = [
    (
        "Engine requests: running, decoding, waiting (vLLM scheduler)",
        "short",
        [
            ("running {{instance}}", f"sum by (instance) (chat_worker_running_requests{{{M}}})"),
            ("decoding {{instance}}", f"sum by (instance) (chat_worker_decoding_requests{{{M}}})"),
            ("waiting {{instance}}", f"sum by (instance) (chat_worker_waiting_requests{{{M}}})"),
        ],
    ),
    ("Free slots", "short", [("{{instance}}", f"sum by (instance) (chat_worker_free_slots{{{M}}})")]),
    (
        "KV cache usage",
        "percentunit",
        [("{{instance}}", f"max by (instance) (chat_worker_kv_cache_usage_ratio{{{M}}})")],
    ),
    PREFIX_CACHE_HIT_RATE,
    (
        "Generated tokens per second",
        "short",
        [("{{instance}}", f"sum by (instance) (rate(chat_worker_generated_tokens_total{{{M}}}[{RATE}]))")],
    ),
    (
        "Jobs per second by outcome",
        "reqps",
        [("{{outcome}}", f"sum by (outcome) (rate(chat_worker_jobs_total{{{M}}}[{RATE}]))")],
    ),
    ("Job duration", "s", quantiles("chat_worker_job_duration_seconds")),
    (
        "Aborts per second by reason",
        "reqps",
        [("{{reason}}", f"sum by (reason) (rate(chat_worker_aborts_total{{{M}}}[{RATE}]))")],
    ),
    (
        "Reclaims, dead letters, hand-backs (last hour)",
        "short",
        [
            ("reclaimed", f"sum(increase(chat_worker_reclaimed_jobs_total{{{M}}}[1h]))"),
            ("dead-lettered", f"sum(increase(chat_worker_dead_letters_total{{{M}}}[1h]))"),
            ("handed back", f"sum(increase(chat_worker_handed_back_total{{{M}}}[1h]))"),
        ],
    ),
]


def dashboard(uid: str, title: str, panels: list[tuple[str, str, list[tuple[str, str]]]]) -> dict:  # type: ignore[type-arg]
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    return {
        "uid": uid,
        "title": title,
        "tags": ["chat-service"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": datasource,
                    "query": {"query": "label_values(chat_gateway_requests_total, model)", "refId": "model"},
                    "definition": "label_values(chat_gateway_requests_total, model)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": [
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": datasource,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {
                        "refId": chr(ord("A") + j),
                        "expr": expr,
                        "legendFormat": legend,
                        "datasource": datasource,
                    }
                    for j, (legend, expr) in enumerate(targets)
                ],
            }
            for i, (title, unit, targets) in enumerate(panels)
        ],
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, board in {
        "overview": dashboard("chat-overview", "Chat service: overview", OVERVIEW),
        "worker": dashboard("chat-worker", "Chat service: workers", WORKER),
    }.items():
        (OUT / f"{name}.json").write_text(json.dumps(board, indent=2) + "\n")


if __name__ == "__main__":
    main()
