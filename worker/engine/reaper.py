"""Engine processes die with the worker, however and whenever the worker dies.

vLLM runs its engine core in child processes (`VLLM::EngineCore`, and on CPU its model
runner). vLLM does not watch its parent: when the worker is SIGKILLed those children are
orphaned and live on holding their memory (a GPU, on a GPU machine). The reaper is a small
process the worker starts just before the engine. It reads a pipe whose only writer is the
worker; when the worker dies the kernel closes that pipe, and the reaper kills the engine's
processes.

Which processes? While the engine starts (minutes on a GPU: loading weights, capturing
CUDA graphs, the time a liveness probe may kill the worker in) the reaper polls the
worker's descendants and guards every new one. Once the engine is up the worker sends the
exact list, and the reaper guards those (and, when it kills, their descendants). A clean
stop shuts the engine down first and then closes the pipe, so the reaper finds nothing
left to kill.

    python -m worker.engine.reaper WORKER_PID [EXCLUDED_PID ...]   (started by Reaper.start)
"""

import contextlib
import os
import select
import subprocess
import sys
from dataclasses import dataclass

import psutil

# How often the reaper looks for new engine processes while the engine starts.
_POLL_SECONDS = 0.1


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


def _is_resource_tracker(process: psutil.Process) -> bool:
    """Python's multiprocessing resource tracker: spared, because once the processes it tracks
    are gone it unlinks the shared memory they left (vLLM's ring buffers in /dev/shm)."""
    with contextlib.suppress(psutil.Error):
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())
    return False


def _descendants(pid: int, exclude: set[int]) -> set[_Target]:
    targets = set()
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.pid not in exclude and not _is_resource_tracker(child):
                    targets.add(_Target(child.pid, child.create_time()))
    return targets


class Reaper:
    """The worker's handle on its reaper process."""

    def __init__(self, process: subprocess.Popen[bytes], exclude: set[int]) -> None:
        self._process: subprocess.Popen[bytes] | None = process
        self._exclude = exclude  # processes that are not the engine's: those before it, the reaper

    @classmethod
    def start(cls) -> "Reaper":
        """Starts guarding: call it right before the engine starts its processes.

        The processes this one already has (a test's servers, when the engine runs inside
        pytest) are not the engine's and are left alone.
        """
        exclude = {p.pid for p in psutil.Process().children(recursive=True)}
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid()), *map(str, sorted(exclude))],
            stdin=subprocess.PIPE,
            # Its own session: a Ctrl-C to the worker's process group must not end the guard early.
            start_new_session=True,
        )
        reaper = cls(process, exclude | {process.pid})
        _guarding.append(reaper)
        return reaper

    def _close_in_forked_child(self) -> None:
        # A forked child (vLLM forks its engine processes on GPUs) inherits the pipe's write
        # end: while it held it the pipe would never close, and the reaper never fire.
        if self._process is not None and self._process.stdin is not None:
            self._process.stdin.close()  # this process's copy only; nothing is ever left unflushed
            self._process = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def engine_started(self) -> None:
        """The engine is up: guard exactly the processes it started (no more polling)."""
        if self._process is None or self._process.stdin is None:
            return
        targets = _descendants(os.getpid(), self._exclude)
        self._process.stdin.write((" ".join(t.encode() for t in targets) + "\n").encode())
        self._process.stdin.flush()

    def stop(self) -> None:
        """After a clean engine shutdown: release the guard (it kills whatever is still left)."""
        if self._process is not None and self._process.stdin is not None:
            self._process.stdin.close()
            self._process.wait(timeout=10)
            self._process = None
        with contextlib.suppress(ValueError):
            _guarding.remove(self)


# The reapers this process holds the pipes of; forked children let go of theirs at once.
_guarding: list[Reaper] = []


def _after_fork_in_child() -> None:
    for reaper in _guarding:
        reaper._close_in_forked_child()
    _guarding.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _kill(targets: set[_Target]) -> None:
    victims: list[psutil.Process] = []
    for target in targets:
        try:
            process = psutil.Process(target.pid)
            if process.create_time() == target.create_time:
                victims += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for victim in victims:
        if _is_resource_tracker(victim):
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()  # not waited for: they are not our children, their parent reaps them


def guard(worker_pid: int, exclude: set[int]) -> None:
    """Polls for the engine's processes until the worker names them, then waits for end of file."""
    exclude = exclude | {os.getpid()}
    targets: set[_Target] = set()
    polling = True
    received = b""
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([stdin], [], [], _POLL_SECONDS if polling else None)
        if not readable:
            targets |= _descendants(worker_pid, exclude)
            continue
        chunk = os.read(stdin, 65536)
        if not chunk:
            break  # end of file: the worker has stopped or died
        received += chunk
        if b"\n" in received:  # the worker's list of the engine's processes
            line, _, received = received.partition(b"\n")
            targets = {_Target.decode(word) for word in line.decode().split()}
            polling = False
    _kill(targets)


if __name__ == "__main__":
    guard(int(sys.argv[1]), {int(pid) for pid in sys.argv[2:]})
