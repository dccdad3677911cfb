"""A throwaway Redis Sentinel topology: a primary, a replica and sentinels watching them.

Each is a redis-server child process on its own loopback port and directory. `url` is the
REDIS_URL that reaches the primary through the sentinels (common/redis_client.py). Sentinels
run with a short down-after (1 s) so that a killed primary is replaced within seconds.
"""

import secrets
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

from devstack.redis_server import RedisServer, answers_ping, free_port

SERVICE_NAME = "chat"


class SentinelProcess:
    """`redis-server sentinel.conf --sentinel`, watching one service."""

    def __init__(self, directory: Path, password: str = "") -> None:
        self.directory = directory
        self.port = free_port()
        self.id = secrets.token_hex(20)  # what `sentinel myid` sets; peers know each other by it
        self.password = password
        self.config = ""  # sentinel.conf after port, bind and dir: what to monitor and how
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        # Sentinel rewrites its configuration file (what it learns, its own id), so each has its own.
        conf = self.directory / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n{self.config}")
        args = [binary, str(conf), "--sentinel", "--logfile", "sentinel.log"]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while not answers_ping(self.port, self.password):
            if self._process.poll() is not None:
                raise RuntimeError(f"sentinel exited with {self._process.returncode}; see {self.directory}")
            if time.monotonic() > end:
                raise TimeoutError(f"sentinel did not answer on port {self.port} within {timeout}s")
            time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password or None, socket_timeout=2)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._process = None


class RedisSentinel:
    """Primary and replica (node 0 starts as primary) and `num_sentinels` sentinels with `quorum`.

    password: the data nodes' (requirepass, and masterauth for the replica); sentinel_password:
    the sentinels' own (clients and other sentinels AUTH with it). min_replicas_to_write: the
    primary refuses writes while fewer replicas are connected (see docs/operating.md).
    """

    def __init__(
        self,
        directory: Path,
        num_sentinels: int = 3,
        quorum: int = 2,
        password: str = "",
        sentinel_password: str = "",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        min_replicas_to_write: int = 0,
    ) -> None:
        primary_port = free_port()
        data_args = ["--masterauth", password] if password else []
        data_args += ["--min-replicas-to-write", str(min_replicas_to_write), "--min-replicas-max-lag", "5"]
        # A replica (re)syncs at once, rather than after the 5 s wait for others to share the transfer.
        data_args += ["--repl-diskless-sync-delay", "0"]
        self.nodes = [
            RedisServer(directory / "node-0", primary_port, password=password, args=data_args),
            RedisServer(
                directory / "node-1",
                password=password,
                args=[*data_args, "--replicaof", "127.0.0.1", str(primary_port)],
            ),
        ]
        config = [
            f"sentinel monitor {SERVICE_NAME} 127.0.0.1 {primary_port} {quorum}",
            f"sentinel down-after-milliseconds {SERVICE_NAME} {down_after_ms}",
            f"sentinel failover-timeout {SERVICE_NAME} {failover_timeout_ms}",
        ]
        config += [f"sentinel auth-pass {SERVICE_NAME} {password}"] if password else []
        config += [f"requirepass {sentinel_password}"] if sentinel_password else []
        # The replica and the other sentinels written in up front: found by themselves, they take
        # a hello period (2 s) or two.
        config += [f"sentinel known-replica {SERVICE_NAME} 127.0.0.1 {self.nodes[1].port}"]
        self.sentinels = [
            SentinelProcess(directory / f"sentinel-{i}", password=sentinel_password)
            for i in range(num_sentinels)
        ]
        for sentinel in self.sentinels:
            peers = [
                f"sentinel known-sentinel {SERVICE_NAME} 127.0.0.1 {peer.port} {peer.id}"
                for peer in self.sentinels
                if peer is not sentinel
            ]
            sentinel.config = "\n".join([f"sentinel myid {sentinel.id}", *config, *peers]) + "\n"
        self.password = password
        self.sentinel_password = sentinel_password
        self.min_replicas_to_write = min_replicas_to_write

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        query = (
            f"?sentinel_password={quote(self.sentinel_password, safe='')}" if self.sentinel_password else ""
        )
        return f"redis+sentinel://{auth}{hosts}/{SERVICE_NAME}/0{query}"

    def start(self, timeout: float = 15.0) -> None:
        """Returns once the replica is in sync and every sentinel knows the replica and its peers."""
        try:
            for node in self.nodes:
                node.start()
            for sentinel in self.sentinels:
                sentinel.start()
            end = time.monotonic() + timeout
            while not self._settled():
                if time.monotonic() > end:
                    raise TimeoutError(f"sentinel topology not settled within {timeout}s")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def _settled(self) -> bool:
        with self.node(self.nodes[1].port) as replica:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        with self.node(self.nodes[0].port) as primary:
            # The primary counts its good replicas once a second: it refuses writes until then.
            good = primary.info("replication").get("min_slaves_good_slaves", 0)
            if self.min_replicas_to_write and good < self.min_replicas_to_write:
                return False
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                state = client.sentinel_master(SERVICE_NAME)
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < len(self.sentinels) - 1:
                return False
        return True

    def node(self, port: int) -> redis.Redis:
        """A client of the data node on the port (not through the sentinels)."""
        return redis.Redis(port=port, password=self.password or None, socket_timeout=2)

    def primary_port(self) -> int:
        """The primary's port as the first sentinel that answers reports it."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    _host, port = client.sentinel_get_master_addr_by_name(SERVICE_NAME)
                return int(port)
            except redis.ConnectionError:
                continue
        raise RuntimeError("no sentinel answers")

    def primary(self) -> RedisServer:
        port = self.primary_port()
        return next(node for node in self.nodes if node.port == port)

    def failover(self) -> None:
        """SENTINEL FAILOVER: the sentinels promote the replica without waiting for agreement."""
        with self.sentinels[0].client() as client:
            client.sentinel_failover(SERVICE_NAME)

    def wait_primary_moved(self, old_port: int, timeout: float = 20.0) -> float:
        """Seconds until every sentinel names a primary other than old_port, and it answers as one."""
        start = time.monotonic()
        while True:
            ports = {self._reported_port(s) for s in self.sentinels}
            if len(ports) == 1 and (port := ports.pop()) not in (old_port, None):
                with self.node(port) as client:
                    if client.info("replication")["role"] == "master":
                        return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"the primary is still on port {old_port} after {timeout}s")
            time.sleep(0.05)

    def _reported_port(self, sentinel: SentinelProcess) -> int | None:
        try:
            with sentinel.client() as client:
                return int(client.sentinel_get_master_addr_by_name(SERVICE_NAME)[1])
        except redis.RedisError:
            return None

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()


def main() -> None:
    """Runs a topology in the foreground until Ctrl-C; then `redis-cli -p <sentinel port> sentinel
    failover chat` in another shell shows a failover."""
    from devstack.processes import REPO, serve_until_interrupted

    topology = RedisSentinel(REPO / ".run" / f"sentinel-{free_port()}")
    serve_until_interrupted(topology, note=f"; sentinels on {[s.port for s in topology.sentinels]}")


if __name__ == "__main__":
    main()
