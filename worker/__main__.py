"""Entry point: `python -m worker`. Settings come from the environment (worker/config.py)."""

import asyncio
import logging
import signal
import sys

import uvloop
from redis.asyncio import Redis

from worker.config import WorkerSettings
from worker.consumer import JobConsumer
from worker.engine.base import Engine
from worker.publisher import EventPublisher

log = logging.getLogger("worker")


def build_engine(settings: WorkerSettings) -> Engine:
    from worker.engine.cpu import CpuEngine

    return CpuEngine(settings.model, settings.cpu)


async def serve(settings: WorkerSettings) -> None:
    engine = build_engine(settings)
    await engine.start()
    redis = Redis.from_url(settings.redis_url)
    publisher = EventPublisher(redis)
    publisher.start()
    consumer = JobConsumer(settings, redis, engine, publisher)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, consumer.stop)
    log.info("worker %s serving %s on %s", settings.worker_id, settings.model.name, settings.engine)
    try:
        await consumer.run()
    finally:
        await consumer.wait_idle()
        await publisher.stop()
        await engine.stop()
        await redis.aclose()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = WorkerSettings.from_env()
    except ValueError as exc:
        sys.exit(f"worker: bad settings: {exc}")
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
