"""Serves a process's Prometheus metrics over HTTP (one port per process).

A scraper that asks for OpenMetrics (Accept: application/openmetrics-text, as Prometheus does)
gets it, with the exemplars (trace ids) the classic text format cannot carry.
"""

import logging

from prometheus_client import start_http_server

log = logging.getLogger(__name__)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> int:
    """Starts the /metrics endpoint on a daemon thread; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=addr)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound
