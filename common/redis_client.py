"""Redis connections for gateway and worker: one Redis, the primary that Redis Sentinel names, or
a Redis Cluster.

REDIS_URL picks the topology; outside this module only is_cluster() tells which one runs (a
cluster takes only commands whose keys share a slot):

    redis://[[user]:password@]host[:port][/db]      one Redis; rediss:// with TLS
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]
        [?sentinel_password=...&sentinel_username=...]
                                                    the primary of service_name as the sentinels
                                                    at those addresses (port 26379 unless given) name
                                                    it; rediss+sentinel:// with TLS to both
    redis-cluster://[[user]:password@]host[:port][,host[:port]...][/0]
                                                    Redis Cluster, its nodes found from any of those
                                                    (port 6379 unless given); rediss-cluster:// with TLS

The user and password in front are the data nodes'; sentinel_password (and sentinel_username)
the sentinels' own, when they require one. Percent-encode reserved characters in either.
"""

import asyncio
import logging
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisClusterException, SlotNotCoveredError, TimeoutError

log = logging.getLogger(__name__)

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

DEFAULT_SENTINEL_PORT = 26379
# How often a pool in use asks the sentinels which node is primary. Sentinel demotes an old
# primary that is still up (a manual failover, a healed partition) only some 10 s after it has
# named the new one, and until then the old one accepts writes that the new one never sees:
# connections must leave it as soon as the sentinels name another.
PRIMARY_CHECK_SECONDS = 1.0
SENTINEL_TIMEOUT_SECONDS = 1.0  # connect and reply timeouts of a query to one sentinel
_LOOKUP_REUSE_SECONDS = 0.1  # a primary the sentinels named this recently is not asked again

DEFAULT_CLUSTER_PORT = 6379
# How often a cluster command that met a connection error, a timeout or CLUSTERDOWN is sent again,
# each time after reloading the slot map from the nodes. redis-py retries at once, whatever the
# Retry's backoff (it waits 0.25 s after CLUSTERDOWN, and in pipelines, only). A primary that
# died: the first try fails on it, the reload finds the replica promoted in its place once the
# cluster has, the retry goes there. The second retry is for a transaction, which reloads the map
# on every 2nd error only (reinitialize_steps below), and for a reload answered by a node that had
# not heard of the promotion yet. Not more: a node gone without a trace costs a connect timeout
# per try.
CLUSTER_RETRIES = 2

URL_FORMS = (
    "redis://[[user]:password@]host[:port][/db] (rediss:// for TLS) or "
    "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]"
    "[?sentinel_password=...] (rediss+sentinel:// for TLS) or "
    "redis-cluster://[[user]:password@]host[:port][,host[:port]...] (rediss-cluster:// for TLS)"
)
_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
_SENTINEL_QUERY = ("sentinel_password", "sentinel_username")
_CLUSTER_SCHEMES = {"redis-cluster": False, "rediss-cluster": True}  # scheme -> TLS


@dataclass(frozen=True)
class SentinelUrl:
    """A REDIS_URL that names sentinels and the service whose primary they find."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False


@dataclass(frozen=True)
class ClusterUrl:
    """A REDIS_URL that names nodes of a Redis Cluster (any of them: the client finds the rest)."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in _SENTINEL_SCHEMES


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in _CLUSTER_SCHEMES


def is_cluster(client_or_url: Redis | str) -> bool:
    """Whether a client from connect(), or the REDIS_URL given it, is of a Redis Cluster: there,
    the keys of one command, script or transaction must share a slot ({hash tags}), and a
    keyless command (WAIT, INFO) goes to one node of several."""
    if isinstance(client_or_url, str):
        return is_cluster_url(client_or_url)
    return isinstance(client_or_url, RedisCluster)


def on_node_of(client: Redis, key: str) -> dict[str, Any]:
    """Options that send a keyless command (WAIT) to the node serving key: on a cluster, keyless
    commands otherwise go to one default node; elsewhere there is one node, and no option."""
    if not isinstance(client, RedisCluster):
        return {}
    return {"target_nodes": client.get_node_from_key(key)}


def check_url(url: str) -> str:
    """Returns url if it is a REDIS_URL connect() takes; else ValueError naming REDIS_URL and the forms."""
    if is_sentinel_url(url):
        parse_sentinel_url(url)
        return url
    if is_cluster_url(url):
        parse_cluster_url(url)
        return url
    try:
        parse_url(url)
    except ValueError as exc:
        raise _bad_url(url, str(exc)) from None
    return url


def parse_sentinel_url(url: str) -> SentinelUrl:
    """redis+sentinel://... as its parts; ValueError (naming REDIS_URL) when malformed."""
    scheme, user, password, hosts, path, query = _split(url)
    sentinels = _hosts(url, hosts, DEFAULT_SENTINEL_PORT, "sentinel")
    segments = [unquote(s) for s in path.split("/")]
    if segments and segments[-1] == "" and len(segments) > 1:
        segments.pop()  # a trailing slash
    if not segments[0] or len(segments) > 2:
        raise _bad_url(url, "it must name the service after the sentinels: .../service_name[/db]")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise _bad_url(url, f"the database must be a number, got {segments[1]!r}")
        db = int(segments[1])
    # Split by hand, not parse_qs: that decodes "+" as a space, which the userinfo password does not.
    params: dict[str, list[str]] = {}
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        params.setdefault(unquote(name), []).append(unquote(value))
    if set(params) - set(_SENTINEL_QUERY):
        # Not echoed: a password with an unencoded & would show its tail as a parameter name.
        raise _bad_url(url, f"its only parameters are {list(_SENTINEL_QUERY)} (percent-encode & in values)")
    return SentinelUrl(
        sentinels=sentinels,
        service_name=segments[0],
        db=db,
        username=unquote(user) or None,
        password=unquote(password) or None,
        sentinel_username=params.get("sentinel_username", [""])[-1] or None,
        sentinel_password=params.get("sentinel_password", [""])[-1] or None,
        tls=_SENTINEL_SCHEMES[scheme.lower()],
    )


def parse_cluster_url(url: str) -> ClusterUrl:
    """redis-cluster://... as its parts; ValueError (naming REDIS_URL) when malformed."""
    scheme, user, password, hosts, path, query = _split(url)
    nodes = _hosts(url, hosts, DEFAULT_CLUSTER_PORT, "node")
    if path.strip("/") not in ("", "0"):
        raise _bad_url(url, "a cluster has database 0 only: no path after the nodes, or /0")
    if query:
        raise _bad_url(url, "a cluster URL takes no parameters")
    return ClusterUrl(
        nodes=nodes,
        username=unquote(user) or None,
        password=unquote(password) or None,
        tls=_CLUSTER_SCHEMES[scheme.lower()],
    )


def _split(url: str) -> tuple[str, str, str, str, str, str]:
    """scheme://[user[:password]@]hosts[/path][?query] as (scheme, user, password, hosts, path,
    query); user and password still percent-encoded."""
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return scheme, user, password, hosts, path, query


def _hosts(url: str, text: str, default_port: int, role: str) -> tuple[tuple[str, int], ...]:
    """host[:port],[IPv6]:port,... as (host, port) pairs; role names them in errors."""
    return tuple(_host_port(url, part, default_port, role) for part in text.split(","))


def _host_port(url: str, text: str, default_port: int, role: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host:
        raise _bad_url(url, f"every {role} needs a host: host[:port],host[:port],...")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad_url(url, f"{role} port must be a number from 1 to 65535, got {port!r}")
    return host, int(port)


def _bad_url(url: str, problem: str) -> ValueError:
    return ValueError(f"REDIS_URL must be {URL_FORMS}: {problem} (got {redacted(url)!r})")


def redacted(url: str) -> str:
    """url with its passwords replaced by ***, fit for logs and error messages."""
    # Everything between :// and the last @ may be a password (one with an unencoded / or @ too).
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    url = scheme + sep + rest
    return re.sub(r"(sentinel_password=).*?(&sentinel_username=|$)", r"\1***\2", url)


def connect(url: str, tls_ca_file: str = "", max_connections: int = MAX_CONNECTIONS, **options: Any) -> Redis:
    """A client for url (any form above); tls_ca_file verifies the server.

    Options are redis-py's; socket timeouts and TCP keepalive default to the values above. For
    a cluster, max_connections is per node, and a command that finds all of a node's connections
    in use fails (MaxConnectionsError) instead of waiting for one.
    """
    options.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT_SECONDS)
    options.setdefault("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT_SECONDS)
    options.setdefault("socket_keepalive", True)
    options.setdefault("socket_keepalive_options", _KEEPALIVE_OPTIONS)
    if is_cluster_url(url):
        options.setdefault("retry", Retry(NoBackoff(), CLUSTER_RETRIES))
        return _connect_cluster(parse_cluster_url(url), tls_ca_file, max_connections, options)
    # One immediate retry on a connection error or timeout: a pooled connection gone stale across a
    # Redis restart or a failover reconnects instead of failing the command; a Redis that is down
    # still fails at once. A retried command may have run already: what is not idempotent
    # (queueing a job, rate limits) carries its own marker, see common/keys.py.
    options.setdefault("retry", Retry(NoBackoff(), 1))
    if is_sentinel_url(url):
        return _connect_sentinel(parse_sentinel_url(url), tls_ca_file, max_connections, options)
    if url.startswith("rediss://") and tls_ca_file:
        options["ssl_ca_certs"] = tls_ca_file
    if url.startswith("unix://"):  # no TCP under it: its connections take no keepalive options
        options.pop("socket_keepalive")
        options.pop("socket_keepalive_options")
    pool = BlockingConnectionPool.from_url(
        check_url(url), max_connections=max_connections, timeout=POOL_TIMEOUT_SECONDS, **options
    )
    return Redis(connection_pool=pool)


def _connect_sentinel(
    target: SentinelUrl, tls_ca_file: str, max_connections: int, options: dict[str, Any]
) -> Redis:
    tls: dict[str, Any] = {}
    if target.tls:
        tls = {"ssl": True, "ssl_ca_certs": tls_ca_file} if tls_ca_file else {"ssl": True}
    # Sentinel queries get the keepalive of commands to the primary, but no retry (redis-py asks the
    # next sentinel instead) and short timeouts (a sentinel answers at once or is gone): a lost
    # sentinel must not hold a reconnect for the command timeouts of every sentinel in the list.
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_keepalive")}
    sentinel_options |= {
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": min(options["socket_timeout"], SENTINEL_TIMEOUT_SECONDS),
        "socket_connect_timeout": min(options["socket_connect_timeout"], SENTINEL_TIMEOUT_SECONDS),
    }
    sentinel = Sentinel(
        target.sentinels,
        sentinel_kwargs={
            **sentinel_options,
            **tls,
            "username": target.sentinel_username,
            "password": target.sentinel_password,
        },
    )
    client: Redis = sentinel.master_for(
        target.service_name,
        connection_pool_class=PrimaryPool,
        connection_class=PrimarySSLConnection if target.tls else PrimaryConnection,
        max_connections=max_connections,
        timeout=POOL_TIMEOUT_SECONDS,
        db=target.db,
        username=target.username,
        password=target.password,
        **tls,
        **options,
    )
    return client


def _connect_cluster(
    target: ClusterUrl, tls_ca_file: str, max_connections: int, options: dict[str, Any]
) -> Redis:
    tls: dict[str, Any] = {}
    if target.tls:
        tls = {"ssl": True, "ssl_ca_certs": tls_ca_file} if tls_ca_file else {"ssl": True}
    client = ClusterClient(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        # The nodes in REDIS_URL, not those the cluster announces, are where every reload of the
        # slot map starts: a DNS name there keeps working when the nodes behind it get new addresses.
        dynamic_startup_nodes=False,
        # Of the MOVED replies a client gets (a manual failover, resharding), every 2nd drops all
        # its connections (blocking reads in flight too: their retry reopens them) and has the
        # next command reload the slot map; the others update the map from the reply (after a
        # failover: every slot of that node at once). A transaction, which retries on its own
        # (CLUSTER_RETRIES times), reloads the map on every 2nd connection error or MOVED: its
        # 2nd try at the latest reaches the promoted replica. redis-py's 5 failed the first
        # transaction after a failover; 0, every one until some other command reloaded the map;
        # 1 never follows a MOVED, and fails the command after 16 of them ("TTL exhausted").
        reinitialize_steps=2,
        max_connections=max_connections,
        username=target.username,
        password=target.password,
        **tls,
        **options,
    )
    # RedisCluster is no subclass of Redis, but it has every command used here, with the same
    # signatures, and the same pipeline(), register_script() and aclose(): the rest of the code
    # keeps its Redis annotations, and asks is_cluster() where the topology matters.
    return cast(Redis, client)


# XREAD and XREADGROUP options before STREAMS, and how many values each takes.
_STREAM_READ_OPTIONS = {
    b"BLOCK": 1,
    b"COUNT": 1,
    b"GROUP": 2,
    b"NOACK": 0,
    b"MAXCOUNT": 1,
    b"MAXSIZE": 1,
    b"CLAIM": 1,
}


# How redis-py's RedisClusterException says that it found no node to load the slot map from.
_CLUSTER_UNREACHABLE = ("Redis Cluster cannot be connected", "startup_nodes could not agree")


class ClusterClient(RedisCluster):
    """redis-py's RedisCluster, except that it finds the keys of XREAD and XREADGROUP itself.

    redis-py (8.1.0, 8.2.0) asks a node for the keys of a command whose key positions vary (COMMAND
    GETKEYS, twice per command, once in a pipeline), always the node that was its default one
    when it last loaded the slot map: each blocking read cost two more round trips, all to that
    node, and once that node died every XREAD failed, without a retry, until some other command
    made the client reload the map. redis-py routes the slot of the keys found here as before.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            # No node answers, or a slot has no primary (mid-failover): to callers that is Redis
            # unreachable, which they all handle as a RedisError; redis-py's exception is none. Its
            # other RedisClusterExceptions are faults of the command (keys in several slots).
            if isinstance(exc, SlotNotCoveredError) or str(exc).startswith(_CLUSTER_UNREACHABLE):
                raise ConnectionError(f"Redis Cluster unavailable: {exc}") from exc
            raise

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if str(command).upper() in ("XREAD", "XREADGROUP"):
            slots = {self.keyslot(key) for key in _stream_read_keys(args)}
            if len(slots) == 1:
                return slots.pop()
        return await super()._determine_slot(command, *args)  # errors (keys in several slots) included


def _stream_read_keys(args: tuple[Any, ...]) -> list[Any]:
    """The stream names of XREAD or XREADGROUP arguments (those after the command name); none if
    the arguments are not as expected."""
    i = 0
    while i < len(args):
        word = args[i].upper() if isinstance(args[i], bytes) else str(args[i]).upper().encode()
        if word == b"STREAMS":
            rest = args[i + 1 :]
            return list(rest[: len(rest) // 2]) if rest and len(rest) % 2 == 0 else []
        if word not in _STREAM_READ_OPTIONS:
            return []
        i += 1 + _STREAM_READ_OPTIONS[word]
    return []


class PrimaryPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections to the primary the sentinels name, blocking when all are in use like the
    single-node pool, and moved to a new primary within PRIMARY_CHECK_SECONDS of a failover.

    redis-py resolves the primary only when it opens a connection, and drops a connection whose
    node answers READONLY (it was demoted under it) so that the command's retry reconnects. The
    check here also moves connections off an old primary that has not been demoted yet.
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self._next_check = 0.0
        self._check: asyncio.Task[None] | None = None
        self._lookup: asyncio.Future[Any] | None = None  # the sentinels' answer, shared
        self._looked_up_at = 0.0

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        self._follow_primary()
        address = (getattr(connection, "host", None), getattr(connection, "port", None))
        if connection.is_connected and self.master_address not in (None, address):
            await connection.disconnect()  # to the old primary: reconnects to the new one below
        await super().ensure_connection(connection)

    def _follow_primary(self) -> None:
        """Asks the sentinels, at most once a PRIMARY_CHECK_SECONDS and in the background (no
        command waits for it), whether the primary moved; connections follow when next used."""
        now = time.monotonic()
        if now < self._next_check or (self._check is not None and not self._check.done()):
            return
        self._next_check = now + PRIMARY_CHECK_SECONDS
        self._check = asyncio.create_task(self._check_primary())

    async def _check_primary(self) -> None:
        try:
            await self.get_master_address()  # drops idle connections when the primary moved
        except (ConnectionError, TimeoutError) as exc:
            # No sentinel answers, or none names a primary it sees up: the connection in hand
            # decides whether a command fails.
            log.debug("cannot ask the sentinels for the primary of %s: %s", self.service_name, exc)

    async def get_master_address(self) -> Any:
        """The sentinels' answer, one query for everybody asking at once: after a failover every
        connection of the pool reconnects, and each would ask every sentinel on its own."""
        now = time.monotonic()
        if self._lookup is None or (self._lookup.done() and now - self._looked_up_at > _LOOKUP_REUSE_SECONDS):
            self._lookup = asyncio.ensure_future(super().get_master_address())
            self._looked_up_at = now
        return await asyncio.shield(self._lookup)

    async def aclose(self) -> None:
        try:
            if self._check is not None:
                self._check.cancel()
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()  # each client has its own Sentinel (connect())


class PrimaryConnection(SentinelManagedConnection):
    """A connection that opens every socket to the primary the sentinels name at that moment.

    redis-py resolves the primary in connect() only, but a command's retry reopens a dropped
    connection through connect_check_health(), at the address it had (redis-py issue #3874): after
    a demoted primary answered READONLY, the retry went straight back to it and failed again.
    """

    async def _connect(self) -> None:
        self.host, self.port = await self.connection_pool.get_master_address()
        await super()._connect()

    async def _connect_retry(self) -> None:
        if not self.is_connected:  # _connect() above finds the primary
            await self.connect_check_health(
                check_health=self.connection_pool.check_connection, retry_socket_connect=False
            )


class PrimarySSLConnection(PrimaryConnection, SSLConnection):
    pass
