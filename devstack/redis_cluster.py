"""A throwaway Redis Cluster: N primaries and R replicas of each, on loopback ports.

Each node is a redis-server child process (devstack/redis_server.py) with cluster mode on and
its own directory, port and cluster bus port; `redis-cli --cluster create` assigns the slots
and the replicas. `url` is the REDIS_URL that reaches it (common/redis_client.py). Nodes run
with a short node timeout (1 s), so that a killed primary is replaced within a few seconds.
"""

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

from devstack.redis_server import RedisServer, free_port

NUM_SLOTS = 16384


@dataclass(frozen=True)
class NodeView:
    """One line of CLUSTER NODES: a node as one member of the cluster sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str  # the primary it replicates, "-" for a primary
    slots: tuple[tuple[int, int], ...]  # ranges, both ends included

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


class LocalRedisCluster:
    """`primaries` primaries with `replicas` replicas each (node i is self.nodes[i]).

    password: the nodes' (requirepass, and masterauth so that replicas sync); node_timeout_ms:
    how long a node may not answer before the others count it failed and promote its replica.
    """

    def __init__(
        self,
        directory: Path,
        primaries: int = 3,
        replicas: int = 0,
        password: str = "",
        node_timeout_ms: int = 1000,
    ) -> None:
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        self.directory = directory
        self.num_primaries = primaries
        self.replicas_per_primary = replicas
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        ports = _free_ports(2 * primaries * (1 + replicas))  # a port and a bus port for each node
        self.nodes = [self._node(i, ports[2 * i], ports[2 * i + 1]) for i in range(len(ports) // 2)]
        self._down: set[int] = set()  # ports of nodes killed or stopped since start()
        self._created = False  # the nodes know each other's ports from here on

    def _node(self, i: int, port: int, bus_port: int) -> RedisServer:
        node_dir = self.directory / f"node-{i}"
        args = ["--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf")]
        # The bus port is port + 10000 unless set: none above 55535.
        args += ["--cluster-port", str(bus_port), "--cluster-node-timeout", str(self.node_timeout_ms)]
        # A replica syncs at once, not after a 5 s wait for others; and may always be promoted,
        # however long its primary was gone (tests kill primaries on purpose).
        args += ["--repl-diskless-sync-delay", "0", "--cluster-replica-validity-factor", "0"]
        args += ["--enable-debug-command", "local"]  # freeze(): DEBUG SLEEP, from loopback only
        args += ["--masterauth", self.password] if self.password else []
        return RedisServer(node_dir, port, password=self.password, args=args)

    @property
    def url(self) -> str:
        """REDIS_URL of the cluster, naming every node (final once start() returned: a node whose
        port was taken meanwhile starts on another)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return "redis-cluster://" + auth + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        """Returns once the cluster is ok (wait_ok()). Started again after stop(), the nodes
        rejoin from their nodes.conf as they were."""
        try:
            for i in range(len(self.nodes)):
                self._start_node(i)
            self._down.clear()
            with self.client(self.nodes[0]) as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
            if f"cluster_known_nodes:{len(self.nodes)}" not in info:
                self._create()
                self._created = True
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_node(self, i: int) -> None:
        """Starts node i; on other ports if something took its own since they were picked (a
        node that never ran has nothing that names its ports yet)."""
        for attempt in range(3):
            try:
                self.nodes[i].start()
                return
            except RuntimeError:
                if attempt == 2 or self._created:
                    raise
                shutil.rmtree(self.nodes[i].data_dir, ignore_errors=True)
                self.nodes[i] = self._node(i, *_free_ports(2))

    def _create(self) -> None:
        binary = shutil.which("redis-cli")
        if binary is None:
            raise FileNotFoundError("redis-cli is not installed (apt-get install redis-tools)")
        args = [binary, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes)]
        args += ["--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"]
        env = os.environ | ({"REDISCLI_AUTH": self.password} if self.password else {})
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")

    def client(self, node: RedisServer) -> redis.Redis:
        """A plain client of one node (commands on it are not redirected)."""
        return redis.Redis(port=node.port, password=self.password or None, socket_timeout=2)

    def running(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.port not in self._down]

    def view(self, node: RedisServer) -> dict[str, NodeView]:
        """CLUSTER NODES as `node` sees it, by node id."""
        with self.client(node) as client:
            text = client.execute_command("CLUSTER", "NODES").decode()
        views = {}
        for line in text.splitlines():
            fields = line.split()
            slots = tuple(_slot_range(part) for part in fields[8:] if not part.startswith("["))
            address = fields[1].split("@")[0]
            views[fields[0]] = NodeView(
                node_id=fields[0],
                port=int(address.rpartition(":")[2]),
                flags=frozenset(fields[2].split(",")),
                primary_id=fields[3],
                slots=slots,
            )
        return views

    def node_id(self, node: RedisServer) -> str:
        with self.client(node) as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def by_port(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def primaries(self) -> list[RedisServer]:
        """The nodes that serve slots, as the first running node sees it."""
        return [self.by_port(port) for port in sorted({port for *_, port in self._served()})]

    def primary_for(self, key: str | bytes) -> RedisServer:
        """The node that serves the key's slot (CLUSTER KEYSLOT), as the first running node sees it."""
        return self.by_port(self._serving(self._slot(key), self._served()))

    def keys_on_each_primary(self, prefix: str) -> dict[int, str]:
        """A key each primary serves (by port): the first of prefix-0, prefix-1, ... on each."""
        served = self._served()
        wanted = {port for *_, port in served}
        keys: dict[int, str] = {}
        i = 0
        while set(keys) != wanted:
            key = f"{prefix}-{i}"
            keys.setdefault(self._serving(self._slot(key), served), key)
            i += 1
        return keys

    def _slot(self, key: str | bytes) -> int:
        with self.client(self.running()[0]) as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def _served(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, port of the primary) as the first running node sees it."""
        views = self.view(self.running()[0]).values()
        primaries = [v for v in views if v.is_primary and not v.failing]
        return [(start, end, v.port) for v in primaries for start, end in v.slots]

    @staticmethod
    def _serving(slot: int, served: list[tuple[int, int, int]]) -> int:
        for start, end, port in served:
            if start <= slot <= end:
                return port
        raise RuntimeError(f"slot {slot} is not served by any node")

    def replica_of(self, primary: RedisServer) -> RedisServer:
        """A running replica of the primary (the first, in node order)."""
        primary_id = self.node_id(primary)
        views = self.view(primary).values()
        ports = {v.port for v in views if v.primary_id == primary_id and not v.failing}
        for node in self.running():
            if node.port in ports:
                return node
        raise RuntimeError(f"the node on port {primary.port} has no running replica")

    def kill(self, node: RedisServer) -> None:
        """SIGKILL, as a crash: the others notice within the node timeout and promote a replica."""
        self._down.add(node.port)
        node.kill()

    def revive(self, node: RedisServer) -> None:
        """Starts a killed node again: it rejoins from its nodes.conf (a replica, once replaced)."""
        node.start()
        self._down.discard(node.port)

    def freeze(self, node: RedisServer, seconds: float) -> None:
        """The node does nothing for that long (DEBUG SLEEP), nor answers anybody: a replica that
        lags. Returns when it wakes; under the node timeout, the others do not count it failed."""
        password = self.password or None
        with redis.Redis(port=node.port, password=password, socket_timeout=seconds + 2) as client:
            client.execute_command("DEBUG", "SLEEP", seconds)

    def failover(self, replica: RedisServer, timeout: float = 20.0) -> None:
        """CLUSTER FAILOVER on the replica (its primary still up: it hands over without losing
        writes); returns once the replica serves the slots and the cluster is ok.

        Redis undoes a failover of a shard that failed over shortly before (its old primary
        comes back, after pausing writes for up to 5 s): it is asked again until it holds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.client(replica) as client:
                client.execute_command("CLUSTER", "FAILOVER")
            given_up = min(end, time.monotonic() + 6)  # the replica waits 5 s at most for its primary
            while time.monotonic() < given_up:
                try:
                    if self._ok() and self._serves(replica):
                        return
                except redis.RedisError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"the replica on port {replica.port} is not primary after {timeout}s")

    def _serves(self, node: RedisServer) -> bool:
        """Whether the node is a primary with slots, as the first running node sees it."""
        return any(port == node.port for *_, port in self._served())

    def wait_ok(self, timeout: float = 15.0) -> float:
        """Seconds until the cluster settled: every running node says cluster_state:ok, every
        running replica is in sync, and all of them see the same nodes in the same roles, every
        slot served by a running primary, and every node that is down failed."""
        start = time.monotonic()
        while True:
            try:
                if self._ok():
                    return time.monotonic() - start
            except redis.RedisError:
                pass  # a node busy starting or failing over: ask again
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"the cluster is not ok after {timeout}s")
            time.sleep(0.05)

    def _ok(self) -> bool:
        running = {node.port for node in self.running()}
        topologies = set()
        for node in self.running():
            with self.client(node) as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or f"cluster_slots_ok:{NUM_SLOTS}" not in info:
                    return False
                replication = client.info("replication")
                if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                    return False
            topology = self._topology(node)
            if {port for port, _, _ in topology} != running:
                return False
            topologies.add(topology)
        if len(topologies) != 1:
            return False
        [topology] = topologies
        return sum(end - start + 1 for *_, slots in topology for start, end in slots) == NUM_SLOTS

    def _topology(self, node: RedisServer) -> tuple[tuple[int, int | None, tuple[tuple[int, int], ...]], ...]:
        """(port, its primary's port or None, its slots) of each node `node` sees working."""
        views = self.view(node).values()
        ports = {v.node_id: v.port for v in views}
        return tuple(sorted((v.port, ports.get(v.primary_id), v.slots) for v in views if not v.failing))

    def stop(self) -> None:
        """Stops every node, those that will not stop by SIGKILL; never raises for one node."""
        for node in self.nodes:
            try:
                node.stop()
            except Exception:
                node.kill()
        self._down = {node.port for node in self.nodes}


def _free_ports(count: int) -> list[int]:
    """Loopback ports free now, all different (each held open until all are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _slot_range(text: str) -> tuple[int, int]:
    start, _, end = text.partition("-")
    return int(start), int(end or start)


def main() -> None:
    """Runs a cluster (3 primaries, a replica each) in the foreground until Ctrl-C."""
    from devstack.processes import REPO, serve_until_interrupted

    serve_until_interrupted(LocalRedisCluster(REPO / ".run" / f"cluster-{free_port()}", replicas=1))


if __name__ == "__main__":
    main()
