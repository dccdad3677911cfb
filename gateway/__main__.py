"""Entry point: `python -m gateway`. Settings come from the environment (gateway/config.py)."""

import asyncio
import logging
import signal
import sys

import uvloop

from gateway.catalog import ModelCatalog
from gateway.config import GatewaySettings
from gateway.server import Gateway


async def serve(settings: GatewaySettings) -> None:
    gateway = Gateway(settings, ModelCatalog.load(settings.models, settings.aliases))
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = GatewaySettings.from_env()
    except ValueError as exc:
        sys.exit(f"gateway: bad settings: {exc}")
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
