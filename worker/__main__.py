"""Entry point: `python -m worker`. Settings come from the environment (worker/config.py)."""

import asyncio
import logging
import signal
import sys

import uvloop

from common.metrics_server import serve_metrics
from common.redis_client import connect
from common.tracing import Tracing
from worker import metrics
from worker.config import WorkerSettings
from worker.consumer import JobConsumer
from worker.engine.base import Engine, EngineDead
from worker.publisher import EventPublisher

log = logging.getLogger("worker")


def build_engine(settings: WorkerSettings, tracer: Tracing) -> Engine:
    if settings.engine == "bench":
        from worker.engine.bench import BenchEngine

        return BenchEngine(settings.model, settings.bench_tokens_per_second)
    from worker.engine.vllm import VllmEngine  # the only import of vLLM

    # vLLM exports its own llm_request spans to the same endpoint when tracing is on.
    return VllmEngine(settings.model, settings.vllm, settings.max_concurrency, tracer.endpoint)


async def serve(settings: WorkerSettings) -> None:
    tracer = Tracing.from_env("chat-worker")  # off unless OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set
    engine = build_engine(settings, tracer)
    await engine.start()
    # Metrics answer only once the model is loaded: the Kubernetes startup probe relies on it.
    serve_metrics(settings.metrics_port)
    redis = connect(settings.redis_url, settings.redis_tls_ca_file)
    publisher = EventPublisher(redis)
    publisher.start()
    consumer = JobConsumer(settings, redis, engine, publisher, tracer)
    model = settings.model.name
    metrics.initialize(model)
    metrics.observe_engine(model, engine)
    metrics.FREE_SLOTS.labels(model).set_function(lambda: consumer.free_sequences)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, consumer.stop)
    log.info("worker %s serving %s on %s", settings.worker_id, settings.model.name, settings.engine)
    try:
        await consumer.run()  # returns after SIGTERM and drain; raises if the engine died
    finally:
        await publisher.stop()
        await engine.stop()
        await redis.aclose()
        tracer.shutdown()  # exports the spans still queued


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = WorkerSettings.from_env()
    except ValueError as exc:
        sys.exit(f"worker: bad settings: {exc}")
    try:
        uvloop.run(serve(settings))
    except EngineDead as exc:
        # Exit non-zero so the orchestrator restarts the worker with a fresh engine.
        log.critical("exiting: %s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
