"""Entry point: `python -m gateway`. Settings come from the environment (gateway/config.py)."""

import asyncio
import logging
import signal
import sys

import uvloop

from common.tracing import Tracing
from gateway.catalog import ModelCatalog
from gateway.config import GatewaySettings
from gateway.server import Gateway


async def serve(settings: GatewaySettings) -> None:
    tracer = Tracing.from_env("chat-gateway")  # off unless OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set
    gateway = Gateway(settings, ModelCatalog.load(settings.models, settings.aliases), tracer)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()
    tracer.shutdown()  # exports the spans still queued


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = GatewaySettings.from_env()
    except ValueError as exc:
        sys.exit(f"gateway: bad settings: {exc}")
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
