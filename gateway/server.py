"""Builds the gateway's gRPC server: chat service, health checks and reflection."""

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat.v1 import chat_pb2
from common.metrics_server import serve_metrics
from gateway import metrics
from gateway.catalog import ModelCatalog
from gateway.config import GatewaySettings
from gateway.errors import Overloaded
from gateway.queue import JobQueue
from gateway.servicer import ChatServicer
from gateway.wire import add_chat_service

log = logging.getLogger(__name__)

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
_HEALTH_CHECK_SECONDS = 1.0


class Gateway:
    """One gateway process: gRPC server + its side of the job queue."""

    def __init__(self, settings: GatewaySettings, catalog: ModelCatalog) -> None:
        self.settings = settings
        timeout = settings.redis_timeout_seconds
        self._redis = Redis.from_url(
            settings.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        # The reply reader blocks up to 1 s per XREAD: its socket timeout must be longer.
        self._reader_redis = Redis.from_url(
            settings.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout + 1.0
        )
        Overloaded.retry_after_seconds = settings.retry_after_seconds
        self.queue = JobQueue(self._redis, self._reader_redis, settings.gateway_id, settings.max_queued_jobs)
        self.servicer = ChatServicer(settings, catalog, self.queue)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        add_chat_service(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                CHAT_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = self.server.add_insecure_port(settings.address)
        self._monitor: asyncio.Task[None] | None = None
        self._models = catalog.names

    async def start(self) -> None:
        metrics.initialize(self._models)
        serve_metrics(self.settings.metrics_port)
        await self.queue.start()
        await self.server.start()
        await self._set_serving(True)
        self._monitor = asyncio.create_task(self._watch_redis(), name="redis-health")
        log.info("gateway %s listening on port %d", self.settings.gateway_id, self.port)

    async def stop(self) -> None:
        """Stops accepting calls and lets open ones finish within the shutdown grace period."""
        if self._monitor is not None:
            self._monitor.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_seconds)
        await self.queue.stop()
        await self._redis.aclose()
        await self._reader_redis.aclose()

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", CHAT_SERVICE):
            await self.health.set(service, status)

    async def _watch_redis(self) -> None:
        """Health says NOT_SERVING while Redis is unreachable, so load balancers route around us."""
        serving = True
        while True:
            await asyncio.sleep(_HEALTH_CHECK_SECONDS)
            try:
                for model in self._models:
                    metrics.QUEUE_DEPTH.labels(model).set(await self.queue.waiting_jobs(model))
                ok = True
            except (RedisError, OSError) as exc:
                ok = False
                if serving:
                    log.error("Redis unreachable: %s", exc)
            metrics.REDIS_UP.set(1 if ok else 0)
            if ok != serving:
                serving = ok
                await self._set_serving(ok)
                log.info("health: %s", "SERVING" if ok else "NOT_SERVING")
