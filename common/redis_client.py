"""Redis connections for gateway and worker, with TLS when the URL says rediss://."""

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Connections one process opens at most. Callers beyond it wait for a free one (up to
# POOL_TIMEOUT_SECONDS) instead of failing: redis-py's default pool raises "Too many
# connections" at 100, which 1,000 concurrent jobs reached.
MAX_CONNECTIONS = 64
POOL_TIMEOUT_SECONDS = 10.0


def connect(url: str, tls_ca_file: str = "", max_connections: int = MAX_CONNECTIONS, **options: Any) -> Redis:
    """A client for url (redis:// or rediss://, password in the URL); tls_ca_file verifies the server."""
    if url.startswith("rediss://") and tls_ca_file:
        options["ssl_ca_certs"] = tls_ca_file
    # One immediate retry on a connection error: a pooled connection gone stale across a Redis
    # restart reconnects instead of failing the command; a Redis that is down still fails at once.
    options.setdefault("retry", Retry(NoBackoff(), 1))
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_TIMEOUT_SECONDS, **options
    )
    return Redis(connection_pool=pool)
