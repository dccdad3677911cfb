"""Builds the gateway's gRPC server: chat service, health checks and reflection."""

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis

from chat.v1 import chat_pb2, chat_pb2_grpc
from gateway.catalog import ModelCatalog
from gateway.config import GatewaySettings
from gateway.queue import JobQueue
from gateway.servicer import ChatServicer

log = logging.getLogger(__name__)

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


class Gateway:
    """One gateway process: gRPC server + its side of the job queue."""

    def __init__(self, settings: GatewaySettings, catalog: ModelCatalog) -> None:
        self.settings = settings
        self._redis = Redis.from_url(settings.redis_url)
        self._reader_redis = Redis.from_url(settings.redis_url)
        self.queue = JobQueue(self._redis, self._reader_redis, settings.gateway_id)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        chat_pb2_grpc.add_ChatServiceServicer_to_server(
            ChatServicer(settings, catalog, self.queue), self.server
        )
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

    async def start(self) -> None:
        await self.queue.start()
        await self.server.start()
        for service in ("", CHAT_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("gateway %s listening on port %d", self.settings.gateway_id, self.port)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.queue.stop()
        await self._redis.aclose()
        await self._reader_redis.aclose()
