"""A throwaway stack on this machine: its own redis-server, a gateway and one worker.

For benchmarks and profiles (bench/), which each need a fresh stack on free ports with
settings of their own. Logs go to the given directory.
"""

import subprocess
from pathlib import Path

from devstack import processes
from devstack.redis_server import RedisServer, free_port


class LocalStack:
    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        """env: settings for both processes, on top of the stack's addresses and ports."""
        self.address = f"127.0.0.1:{free_port()}"  # gRPC
        self.http_address = f"127.0.0.1:{free_port()}"
        self.redis = RedisServer(directory / f"redis-{free_port()}")
        self._directory = directory
        self._env = env or {}
        self.gateway: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    def start(self) -> "LocalStack":
        """Returns once the gateway serves; the worker may still be loading its engine."""
        self.redis.start()
        env = {
            "REDIS_URL": self.redis.url,
            "GATEWAY_ADDRESS": self.address,
            "GATEWAY_HTTP_ADDRESS": self.http_address,
            "GATEWAY_METRICS_PORT": "0",  # any free port: several stacks may run side by side
            "WORKER_METRICS_PORT": "0",
            "GATEWAY_NO_WORKER": "queue",  # the first call waits for the worker to load its engine
            **self._env,
        }
        try:
            self.gateway = processes.launch("gateway", env, self._directory / "gateway.log")
            processes.wait_serving(self.address, self.gateway)
            self.worker = processes.launch("worker", env, self._directory / "worker.log")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in (self.worker, self.gateway):
            if process is not None:
                processes.stop(process)
        self.worker = self.gateway = None
        self.redis.stop()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
