"""Engine processes die with the worker, however the worker dies.

vLLM runs its engine core in child processes (`VLLM::EngineCore`, and on CPU its model
runner). vLLM does not watch its parent: when the worker is SIGKILLed those children are
orphaned and live on holding their memory (a GPU, on a GPU machine). The reaper is a small
process the worker starts once the engine is up. It blocks reading a pipe whose only writer
is the worker; when the worker dies the kernel closes that pipe, and the reaper kills the
processes it was given. A clean stop shuts the engine down first and then closes the pipe,
so the reaper finds nothing left to kill.

    python -m worker.engine.reaper PID:START_TIME ...   (started by Reaper.start, not by hand)
"""

import contextlib
import subprocess
import sys
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class _Target:
    pid: int
    create_time: float  # with the pid, names the process even if the pid is reused later

    def encode(self) -> str:
        return f"{self.pid}:{self.create_time!r}"

    @classmethod
    def decode(cls, text: str) -> "_Target":
        pid, _, created = text.partition(":")
        return cls(int(pid), float(created))


class Reaper:
    """The worker's handle on its reaper process."""

    def __init__(self, process: subprocess.Popen[bytes] | None) -> None:
        self._process = process

    @staticmethod
    def children() -> set[int]:
        """Pids of this process's descendants now (to exclude those the engine did not start)."""
        return {p.pid for p in psutil.Process().children(recursive=True)}

    @classmethod
    def start(cls, exclude: set[int]) -> "Reaper":
        """Guards the processes started since `exclude` was taken (call it right after the engine starts)."""
        targets = [
            _Target(p.pid, p.create_time())
            for p in psutil.Process().children(recursive=True)
            if p.pid not in exclude
        ]
        if not targets:
            return cls(None)
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, *(t.encode() for t in targets)],
            stdin=subprocess.PIPE,
            # Its own session: a Ctrl-C to the worker's process group must not end the guard early.
            start_new_session=True,
        )
        return cls(process)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """After a clean engine shutdown: release the guard (it kills whatever is still left)."""
        if self._process is not None and self._process.stdin is not None:
            self._process.stdin.close()
            self._process.wait(timeout=10)
            self._process = None


def _kill(targets: list[_Target]) -> None:
    victims: list[psutil.Process] = []
    for target in targets:
        try:
            process = psutil.Process(target.pid)
            if process.create_time() == target.create_time:
                victims += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()  # not waited for: they are not our children, their parent reaps them


def main(argv: list[str]) -> None:
    targets = [_Target.decode(arg) for arg in argv]
    sys.stdin.buffer.read()  # returns at end of file: the worker has stopped or died
    _kill(targets)


if __name__ == "__main__":
    main(sys.argv[1:])
