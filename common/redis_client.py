"""Redis connections for gateway and worker, with TLS when the URL says rediss://."""

import socket
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Connections one process opens at most. Callers beyond it wait for a free one (up to
# POOL_TIMEOUT_SECONDS) instead of failing: redis-py's default pool raises "Too many
# connections" at 100, which 1,000 concurrent jobs reached.
MAX_CONNECTIONS = 64
POOL_TIMEOUT_SECONDS = 10.0

# The longest a blocking read (XREAD / XREADGROUP BLOCK) may wait for; callers block no longer,
# so that the default socket timeout below never cuts a healthy blocking read short.
MAX_BLOCK_SECONDS = 5.0
# Socket timeout (per read or write) unless the caller sets one. A connection whose peer vanished
# without a FIN (failover, network partition) then fails a command after this long, and the one
# retry below reconnects, instead of blocking a worker forever while it looks healthy.
DEFAULT_SOCKET_TIMEOUT_SECONDS = MAX_BLOCK_SECONDS + 5.0
DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
# TCP keepalive: the kernel probes a connection idle for 10 s every 5 s and drops it after 3
# unanswered probes, so a pooled connection to a vanished peer fails at once when next used.
_KEEPALIVE_OPTIONS = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
}


def connect(url: str, tls_ca_file: str = "", max_connections: int = MAX_CONNECTIONS, **options: Any) -> Redis:
    """A client for url (redis:// or rediss://, password in the URL); tls_ca_file verifies the server.

    Options are redis-py's; socket timeouts and TCP keepalive default to the values above.
    """
    if url.startswith("rediss://") and tls_ca_file:
        options["ssl_ca_certs"] = tls_ca_file
    # One immediate retry on a connection error or timeout: a pooled connection gone stale across a
    # Redis restart reconnects instead of failing the command; a Redis that is down still fails at
    # once. A retried command may have run already: what is not idempotent (queueing a job, rate
    # limits) carries its own marker, see common/keys.py.
    options.setdefault("retry", Retry(NoBackoff(), 1))
    options.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT_SECONDS)
    options.setdefault("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT_SECONDS)
    options.setdefault("socket_keepalive", True)
    options.setdefault("socket_keepalive_options", _KEEPALIVE_OPTIONS)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_TIMEOUT_SECONDS, **options
    )
    return Redis(connection_pool=pool)
