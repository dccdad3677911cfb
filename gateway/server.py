"""Builds the gateway's gRPC server: chat service, health checks and reflection."""

import asyncio
import contextlib
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.exceptions import RedisError

from chat.v1 import chat_pb2
from common import keys
from common.metrics_server import serve_metrics
from common.redis_client import connect
from common.supervise import supervised
from common.tracing import OFF, Tracing
from gateway import metrics
from gateway.access import ModelDirectory, ReflectionKeyCheck
from gateway.auth import Authenticator
from gateway.catalog import ModelCatalog
from gateway.completion_log import CompletionLog
from gateway.config import GatewaySettings
from gateway.errors import Overloaded
from gateway.http import HttpApi
from gateway.idempotency import IdempotencyKeys
from gateway.placement import Placement
from gateway.presence import WorkerPresence
from gateway.queue import JobQueue
from gateway.ratelimit import RateLimiter
from gateway.relay import Relay
from gateway.servicer import ChatServicer
from gateway.wire import add_chat_service

log = logging.getLogger(__name__)

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
_HEALTH_CHECK_SECONDS = 1.0


def server_options(settings: GatewaySettings) -> list[tuple[str, int]]:
    """Transport limits: request size, streams per connection, and keepalive pings."""
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        # Clients may ping at most every 10 s, even without calls; more often ends the connection.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 2),
        # The server pings connections idle for GATEWAY_GRPC_KEEPALIVE_SECONDS (which keeps proxies
        # that honour HTTP/2 PINGs from timing them out) and drops those that do not answer in 20 s.
        ("grpc.keepalive_time_ms", int(settings.grpc_keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS from the certificate files in settings; mutual TLS when a client CA is given."""
    if not settings.tls_cert_file:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    chain = Path(settings.tls_cert_file).read_bytes()
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


# Resumed streams and attached retries reading their logs at once; more wait for a connection.
LOG_READERS = 256


class Gateway:
    """One gateway process: gRPC server + its side of the job queue."""

    def __init__(self, settings: GatewaySettings, catalog: ModelCatalog, tracer: Tracing = OFF) -> None:
        self.settings = settings
        timeout = settings.redis_timeout_seconds
        ca = settings.redis_tls_ca_file
        self._redis = connect(settings.redis_url, ca, socket_connect_timeout=timeout, socket_timeout=timeout)
        # The reply reader blocks up to 1 s per XREAD: its socket timeout must be longer.
        self._reader_redis = connect(
            settings.redis_url,
            ca,
            max_connections=2,
            socket_connect_timeout=timeout,
            socket_timeout=timeout + 1,
        )
        Overloaded.retry_after_seconds = settings.retry_after_seconds
        # A finished completion stays readable for the resume window, and at least as long as its
        # idempotency key may attach a retry to it.
        window = max(settings.resume_window_seconds, settings.idempotency_window_seconds)
        # Resumed streams and attached retries block on their log (XREAD, 1 s): their own pool,
        # so a burst of them cannot take the connections that submits and the reply stream need.
        self._log_redis = connect(
            settings.redis_url,
            ca,
            max_connections=LOG_READERS,
            socket_connect_timeout=timeout,
            socket_timeout=timeout + 1,
        )
        completions = CompletionLog(self._log_redis, window, settings.resume_grace_seconds)
        self.queue = JobQueue(
            self._redis,
            self._reader_redis,
            settings.gateway_id,
            settings.max_queued_jobs,
            window,
            settings.submit_replicas,
            settings.submit_wait_ms,
            settings.job_streams,
        )
        self.queue.flex_max_queued_jobs = settings.flex_max_queued_jobs
        if settings.cache_affinity:
            self.queue.placement = Placement(
                self._redis, settings.affinity_epsilon, settings.affinity_delay_ms / 1000
            )
        auth = Authenticator(self._redis, settings.auth_cache_seconds) if settings.auth else None
        idempotency = IdempotencyKeys(self._redis, settings.idempotency_window_seconds, settings.gateway_id)
        self.relay = Relay(
            settings, catalog, self.queue, auth, RateLimiter(self._redis), idempotency, tracer, completions
        )
        directory = ModelDirectory(catalog, auth)
        self.servicer = ChatServicer(self.relay, directory)
        self.serving = False  # what the health service says; /readyz mirrors it
        self.http = HttpApi(settings, self.relay, directory, auth, self.is_ready)
        self.health = health.aio.HealthServicer()
        # With auth on, reflection (when enabled at all) takes the same keys as the chat calls.
        interceptors = [ReflectionKeyCheck(auth)] if auth is not None and settings.reflection else []
        self.server = grpc.aio.server(options=server_options(settings), interceptors=interceptors)
        add_chat_service(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (
                    CHAT_SERVICE,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                self.server,
            )
        credentials = server_credentials(settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(settings.address)
        else:
            self.port = self.server.add_secure_port(settings.address, credentials)
        self._monitor: asyncio.Task[None] | None = None
        self._catalog = catalog
        self._models = catalog.names
        self.presence = WorkerPresence(
            self._models, settings.no_worker_policy, settings.no_worker_grace_seconds
        )
        self.queue.presence = self.presence
        self.queue.lost_job_check_seconds = settings.lost_job_check_seconds

    async def start(self) -> None:
        metrics.initialize(self._models)
        serve_metrics(self.settings.metrics_port)
        await self.queue.start()
        await self._refresh_models()
        await self.server.start()
        await self.http.start()
        await self._set_serving(True)
        self._monitor = supervised("redis-health", self._watch_redis)
        if self.settings.auth and not self.settings.tls_cert_file:
            log.warning(
                "GATEWAY_AUTH is on but TLS is off: API keys cross the network in clear text;"
                " set GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE, or terminate TLS in front"
            )
        log.info(
            "gateway %s listening on port %d (gRPC) and %d (HTTP)",
            self.settings.gateway_id,
            self.port,
            self.http.port,
        )

    async def stop(self) -> None:
        """Stops accepting calls and lets open ones finish within the shutdown grace period."""
        if self._monitor is not None:
            self._monitor.cancel()
        self.serving = False
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(self.settings.shutdown_grace_seconds), self.http.stop())
        await self.relay.close()
        await self.queue.stop()
        await self._redis.aclose()
        await self._log_redis.aclose()
        await self._reader_redis.aclose()

    async def _refresh_models(self) -> None:
        """Queue depths for the metrics, and the context windows the workers' engines run with."""
        for model in self._models:
            metrics.QUEUE_DEPTH.labels(model).set(await self.queue.waiting_jobs(model))
            metrics.FLEX_QUEUE_DEPTH.labels(model).set(await self.queue.waiting_jobs(model, keys.flex_stream))
            live = await self.queue.live_engines(model)
            window = live.context_window if live is not None else None
            capacity = sum(load.capacity for load in live.loads.values()) if live is not None else 0
            self.queue.waits.set_capacity(model, capacity)
            self._catalog.set_engine_context_window(model, window)
            self.presence.observe(model, window is not None)

    def is_ready(self, model: str | None = None) -> bool:
        """What health says: for the gateway, or (a name or alias) whether it serves that model."""
        if model is None:
            return self.serving
        served = self._catalog.get(model)
        return self.serving and served is not None and self.presence.is_live(served.name)

    async def _set_serving(self, serving: bool) -> None:
        self.serving = serving
        for service in ("", CHAT_SERVICE):
            await self.health.set(service, _status(serving))
        # Per model, for load balancers and probes: `chat.v1.ChatService/<model or alias>` says
        # whether this gateway can serve it now (a live worker runs it).
        for name in [*self._models, *self.settings.aliases]:
            await self.health.set(f"{CHAT_SERVICE}/{name}", _status(self.is_ready(name)))

    async def _watch_redis(self) -> None:
        """Health says NOT_SERVING while Redis is unreachable or events cannot be relayed, so load
        balancers route around us. Recomputed from the present state and set at every tick, so no
        past state (a missed change, a frozen process) outlives the next tick."""
        while True:
            # A tick, or at once when the queue's ability to relay changes.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.queue.relay_state_changed.wait(), _HEALTH_CHECK_SECONDS)
            self.queue.relay_state_changed.clear()
            try:
                await self._refresh_models()
                redis_ok = True
            except (RedisError, OSError) as exc:
                redis_ok = False
                if self.serving:
                    log.error("Redis unreachable: %s", exc)
            # Redis may answer while this gateway still cannot relay events (reply stream lost).
            ok = redis_ok and self.queue.can_relay
            metrics.REDIS_UP.set(1 if redis_ok else 0)
            if ok != self.serving:
                log.info("health: %s", "SERVING" if ok else "NOT_SERVING")
            await self._set_serving(ok)


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
