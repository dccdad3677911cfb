"""REDIS_URL picks one Redis, Sentinel or a Cluster (common/redis_client.py); a malformed one fails
at start-up."""

import pytest
from redis.asyncio.connection import SSLConnection

from common.redis_client import (
    CLUSTER_RETRIES,
    POOL_TIMEOUT_SECONDS,
    ClusterClient,
    ClusterUrl,
    PrimaryConnection,
    PrimaryPool,
    PrimarySSLConnection,
    SentinelUrl,
    check_url,
    connect,
    is_cluster,
    parse_cluster_url,
    parse_sentinel_url,
    redacted,
)
from gateway.config import GatewaySettings
from worker.config import WorkerSettings


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,sentinel-3/chat",
            SentinelUrl((("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)), "chat"),
        ),
        (
            "redis+sentinel://:s%40cret@[::1]:5000,h/queue/2/",
            SentinelUrl((("::1", 5000), ("h", 26379)), "queue", db=2, password="s@cret"),
        ),
        (
            "rediss+sentinel://app:pw@h:1/chat/0?sentinel_password=sp%26x&sentinel_username=watcher",
            SentinelUrl(
                (("h", 1),),
                "chat",
                username="app",
                password="pw",
                sentinel_username="watcher",
                sentinel_password="sp&x",
                tls=True,
            ),
        ),
    ],
)
def test_sentinel_urls_are_parsed(url: str, expected: SentinelUrl) -> None:
    assert parse_sentinel_url(url) == expected
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://h1:26379,h2:26379", "it must name the service"),
        ("redis+sentinel://h1:26379/", "it must name the service"),
        ("redis+sentinel://h1/chat/0/extra", "it must name the service"),
        ("redis+sentinel://h1/chat/zero", "the database must be a number, got 'zero'"),
        ("redis+sentinel://h1,,h2/chat", "every sentinel needs a host"),
        ("redis+sentinel://:pw@/chat", "every sentinel needs a host"),
        ("redis+sentinel://h1:port/chat", "sentinel port must be a number from 1 to 65535, got 'port'"),
        ("redis+sentinel://h1:70000/chat", "got '70000'"),
        ("redis+sentinel://h1/chat?password=x", "its only parameters are"),
        ("redis+sentinel://h1/chat?sentinel_pasword=x", "its only parameters are"),
        ("sentinel://h1:26379/chat", "must specify one of the following schemes"),
        ("localhost:6379", "must specify one of the following schemes"),
    ],
)
def test_malformed_urls_name_redis_url_and_the_forms_it_takes(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=r"^REDIS_URL must be redis://") as caught:
        check_url(url)
    assert problem in str(caught.value)
    assert "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]" in str(
        caught.value
    )
    assert "redis-cluster://[[user]:password@]host[:port][,host[:port]...]" in str(caught.value)


def test_errors_and_logs_never_show_a_password() -> None:
    url = "redis+sentinel://app:hunter2@h1,h2/chat/0?sentinel_password=swordfish&sentinel_username=w"
    assert redacted(url) == "redis+sentinel://***@h1,h2/chat/0?sentinel_password=***&sentinel_username=w"
    assert redacted("rediss://:hunter2@host:6380/0") == "rediss://***@host:6380/0"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"
    with pytest.raises(ValueError) as caught:
        check_url("redis+sentinel://:hunter2@h1/chat?sentinel_password=swordfish&bad=1")
    assert "hunter2" not in str(caught.value)
    assert "swordfish" not in str(caught.value)
    # Unencoded / in a password (base64 has it), & in the sentinels': still nothing shown.
    for url in ("redis+sentinel://:ab/cd@s0/chat", "redis+sentinel://s0/chat?sentinel_password=a&bsecret"):
        with pytest.raises(ValueError) as caught:
            check_url(url)
        assert "cd" not in str(caught.value).split("got")[-1] and "bsecret" not in str(caught.value)


def test_a_plus_in_a_password_is_a_plus_in_both_places() -> None:
    parsed = parse_sentinel_url("redis+sentinel://:a+b@s0/chat?sentinel_password=c+d")
    assert (parsed.password, parsed.sentinel_password) == ("a+b", "c+d")


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://:pw@redis:6380/1", "unix:///tmp/r.sock"]
)
def test_single_redis_urls_are_accepted_as_before(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize("settings", [GatewaySettings, WorkerSettings])
def test_a_malformed_redis_url_is_a_bad_setting(settings: type[GatewaySettings | WorkerSettings]) -> None:
    with pytest.raises(ValueError, match="REDIS_URL must be"):
        settings.from_env({"REDIS_URL": "redis+sentinel://h1:26379"})
    good = "redis+sentinel://h1,h2,h3/chat"
    assert settings.from_env({"REDIS_URL": good}).redis_url == good


async def test_a_sentinel_client_keeps_the_single_node_options() -> None:
    # Nothing connects until the first command: the pool and its options can be looked at offline.
    client = connect(
        "redis+sentinel://:pw@h1:1,h2:2/chat/3?sentinel_password=sp",
        max_connections=7,
        socket_timeout=2.5,
    )
    try:
        pool = client.connection_pool
        assert isinstance(pool, PrimaryPool)
        assert (pool.max_connections, pool.timeout) == (7, POOL_TIMEOUT_SECONDS)
        assert pool.connection_class is PrimaryConnection
        options = pool.connection_kwargs
        assert (options["db"], options["password"], options["socket_timeout"]) == (3, "pw", 2.5)
        assert options["socket_keepalive"] is True
        assert options["retry"].get_retries() == 1
        sentinels = pool.sentinel_manager.sentinels
        assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
        sentinel_options = sentinels[0].connection_pool.connection_kwargs
        # Sentinel queries: short timeouts and no retry, so a lost sentinel costs a second, once.
        assert (sentinel_options["password"], sentinel_options["socket_timeout"]) == ("sp", 1.0)
        assert sentinel_options["retry"].get_retries() == 0
    finally:
        await client.aclose()


async def test_rediss_sentinel_uses_tls_to_sentinels_and_data_nodes() -> None:
    client = connect("rediss+sentinel://h1/chat", tls_ca_file="/etc/ca.pem")
    try:
        pool = client.connection_pool
        assert isinstance(pool, PrimaryPool)
        assert pool.connection_class is PrimarySSLConnection
        assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
        [sentinel] = pool.sentinel_manager.sentinels
        assert sentinel.connection_pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis-cluster://10.0.0.1:7000,10.0.0.2,redis-2.redis:7002",
            ClusterUrl((("10.0.0.1", 7000), ("10.0.0.2", 6379), ("redis-2.redis", 7002))),
        ),
        ("redis-cluster://node", ClusterUrl((("node", 6379),))),
        ("redis-cluster://node/", ClusterUrl((("node", 6379),))),
        (
            "redis-cluster://:s%40cret@[::1]:7000,h/0",
            ClusterUrl((("::1", 7000), ("h", 6379)), password="s@cret"),
        ),
        (
            "rediss-cluster://app:a+b@h1:7000,h2:7001/0/",
            ClusterUrl((("h1", 7000), ("h2", 7001)), username="app", password="a+b", tls=True),
        ),
        ("REDISS-CLUSTER://h", ClusterUrl((("h", 6379),), tls=True)),
    ],
)
def test_cluster_urls_are_parsed(url: str, expected: ClusterUrl) -> None:
    assert parse_cluster_url(url) == expected
    assert check_url(url) == url
    assert is_cluster(url)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis-cluster://h1/1", "a cluster has database 0 only: no path after the nodes, or /0"),
        ("redis-cluster://h1,h2/0/1", "a cluster has database 0 only"),
        ("rediss-cluster://h1/chat", "a cluster has database 0 only"),
        ("redis-cluster://h1,,h2", "every node needs a host: host[:port],host[:port],..."),
        ("redis-cluster://:pw@", "every node needs a host"),
        ("redis-cluster://h1:port", "node port must be a number from 1 to 65535, got 'port'"),
        ("redis-cluster://h1:0,h2", "node port must be a number from 1 to 65535, got '0'"),
        ("redis-cluster://h1:70000", "got '70000'"),
        ("redis-cluster://h1?password=x", "a cluster URL takes no parameters"),
        ("redis+cluster://h1", "must specify one of the following schemes"),
    ],
)
def test_malformed_cluster_urls_name_redis_url_and_the_forms_it_takes(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=r"^REDIS_URL must be redis://") as caught:
        check_url(url)
    assert problem in str(caught.value)
    assert "(rediss-cluster:// for TLS)" in str(caught.value)


def test_cluster_urls_never_show_a_password() -> None:
    assert redacted("redis-cluster://app:hunter2@h1:7000,h2:7001") == "redis-cluster://***@h1:7000,h2:7001"
    assert redacted("rediss-cluster://:hunter2@h1/0") == "rediss-cluster://***@h1/0"
    assert redacted("redis-cluster://h1,h2") == "redis-cluster://h1,h2"
    # A database, a parameter, an unencoded / in the password: refused, the password not shown.
    for url in (
        "redis-cluster://:hunter2@h1/1",
        "redis-cluster://:hunter2@h1?x=1",
        "redis-cluster://:ab/cd@h1",
    ):
        with pytest.raises(ValueError) as caught:
            check_url(url)
        shown = str(caught.value).split("got")[-1]
        assert "hunter2" not in shown and "cd" not in shown


@pytest.mark.parametrize("settings", [GatewaySettings, WorkerSettings])
def test_a_cluster_redis_url_is_a_setting(settings: type[GatewaySettings | WorkerSettings]) -> None:
    good = "redis-cluster://h1:7000,h2:7001"
    assert settings.from_env({"REDIS_URL": good}).redis_url == good
    with pytest.raises(ValueError, match="REDIS_URL must be"):
        settings.from_env({"REDIS_URL": "redis-cluster://h1:7000/2"})


async def test_a_cluster_client_keeps_the_single_node_options() -> None:
    # Nothing connects until the first command: the nodes and their options can be looked at offline.
    client = connect("redis-cluster://app:pw@h1:7000,h2", max_connections=7, socket_timeout=2.5)
    try:
        assert isinstance(client, ClusterClient)
        assert is_cluster(client)
        assert client.retry.get_retries() == CLUSTER_RETRIES
        assert client.reinitialize_steps == 2
        nodes = list(client.nodes_manager.startup_nodes.values())
        assert [(node.host, node.port) for node in nodes] == [("h1", 7000), ("h2", 6379)]
        for node in nodes:
            assert node.max_connections == 7  # per node
            assert node.connection_class is not SSLConnection
            options = node.connection_kwargs
            assert (options["username"], options["password"], options["socket_timeout"]) == ("app", "pw", 2.5)
            assert options["socket_connect_timeout"] == 5.0
            assert options["socket_keepalive"] is True
            assert options["socket_keepalive_options"]  # TCP_KEEPIDLE and the others, as for one Redis
    finally:
        await client.aclose()


async def test_rediss_cluster_uses_tls_to_every_node() -> None:
    client = connect("rediss-cluster://h1,h2", tls_ca_file="/etc/ca.pem")
    try:
        assert isinstance(client, ClusterClient)
        for node in client.nodes_manager.startup_nodes.values():
            assert node.connection_class is SSLConnection
            assert node.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    finally:
        await client.aclose()


async def test_only_cluster_clients_are_clusters() -> None:
    client = connect("redis://localhost:6379/0")
    try:
        assert not is_cluster(client)
        assert not is_cluster("redis://localhost:6379/0")
        assert not is_cluster("redis+sentinel://h1/chat")
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("XREAD", (b"BLOCK", "1000", b"COUNT", "10", b"STREAMS", "{j}a", "{j}b", "0", "$")),
        ("XREADGROUP", (b"GROUP", "streams", "c", b"COUNT", "1", b"NOACK", b"STREAMS", "{j}a", ">")),
        ("xread", ("streams", b"{j}c", "0")),
    ],
)
async def test_the_slot_of_a_stream_read_is_found_without_asking_a_node(command: str, args: tuple) -> None:
    client = connect("redis-cluster://h1")  # not reachable: nothing may be asked of it
    try:
        assert isinstance(client, ClusterClient)
        assert await client._determine_slot(command, *args) == client.keyslot("{j}")
    finally:
        await client.aclose()
