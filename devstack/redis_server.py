"""A throwaway redis-server on its own port and data directory."""

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and never one this process was given before: the kernel
    may hand the same free port to two binds in a row, and a process that asks for two ports
    before it listens on either (a gateway's HTTP and metrics ports) then fails to start."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


class RedisServer:
    """redis-server as a child process; start(), stop() and start() again keep the same port."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        appendonly: bool = False,
        password: str = "",
        args: Sequence[str] = (),
    ) -> None:
        """password: clients must AUTH with it (requirepass); args: more redis-server options."""
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.args = tuple(args)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir)]
        args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no", "--logfile", "redis.log"]
        args += ["--requirepass", self.password] if self.password else []
        args += self.args
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._process.returncode}; see {self.data_dir}"
                )
            if answers_ping(self.port, self.password):
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._process = None

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed or saved on the way out."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None


def answers_ping(port: int, password: str = "") -> bool:
    """Whether a redis-server (or a sentinel) on the port answers PING, after AUTH when given a password."""
    command = b"PING\r\n"
    if password:
        secret = password.encode()
        command = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret) + command
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(command)
            reply = b""
            while reply.count(b"\r\n") < (2 if password else 1):
                if not (data := s.recv(64)):
                    break
                reply += data
            return reply.endswith(b"+PONG\r\n")
    except OSError:
        return False
