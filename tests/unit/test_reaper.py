"""The reaper's guard, on real processes (`sleep` stands in for vLLM's engine processes)."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from worker.engine.reaper import Reaper


def spawn_sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def wait_exit(process: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    return process.wait(timeout=timeout)


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    process = spawn_sleeper()
    yield process
    process.kill()
    process.wait()


def test_processes_started_while_the_engine_starts_are_killed_with_the_guard(
    bystander: subprocess.Popen[bytes],
) -> None:
    reaper = Reaper.start()
    engine = spawn_sleeper()
    time.sleep(0.5)  # the reaper polls every 0.1 s while the engine starts
    reaper.stop()  # the worker's pipe closes, as when it dies
    assert wait_exit(engine) == -9
    assert bystander.poll() is None, "a process that predates the engine was killed"


def test_once_the_engine_is_up_only_its_processes_are_guarded(bystander: subprocess.Popen[bytes]) -> None:
    reaper = Reaper.start()
    engine = spawn_sleeper()
    reaper.engine_started()
    later = spawn_sleeper()  # started after the engine: not the engine's
    time.sleep(0.3)
    reaper.stop()
    assert wait_exit(engine) == -9
    assert later.poll() is None and bystander.poll() is None
    later.kill()
    later.wait()


def test_a_guarded_process_children_die_too() -> None:
    reaper = Reaper.start()
    engine = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
    time.sleep(0.3)
    [grandchild] = psutil.Process(engine.pid).children()
    reaper.engine_started()
    reaper.stop()
    wait_exit(engine)  # killed, or ended on its own once its child was killed first: either way gone
    psutil.wait_procs([grandchild], timeout=5)
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE


# A worker that starts the reaper, then an "engine" process the way vLLM does (fork on GPUs,
# spawn on CPUs), which creates shared memory like vLLM's ring buffers; prints its pid and name.
WORKER = """
import multiprocessing, sys, time
from multiprocessing import shared_memory
from worker.engine.reaper import Reaper

def engine_core(names):
    shm = shared_memory.SharedMemory(create=True, size=1 << 16)
    names.put(shm.name)
    time.sleep(60)

if __name__ == "__main__":
    reaper = Reaper.start()
    context = multiprocessing.get_context(sys.argv[1])
    names = context.Queue()
    engine = context.Process(target=engine_core, args=(names,))
    engine.start()
    name = names.get()
    reaper.engine_started()
    print(engine.pid, name, flush=True)
    time.sleep(60)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_sigkilled_worker_takes_its_engine_and_shared_memory_along(
    start_method: str, tmp_path: Path
) -> None:
    script = tmp_path / "a_worker.py"  # not worker.py: it would shadow the package
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # as pytest sees the project
    worker = subprocess.Popen(
        [sys.executable, str(script), start_method], stdout=subprocess.PIPE, text=True, env=env
    )
    assert worker.stdout is not None
    pid, name = worker.stdout.readline().split()
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 5
    while not (gone(int(pid)) and not Path("/dev/shm", name).exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    # A forked engine inherits the reaper's pipe: it must let go of it, or the pipe never closes.
    assert gone(int(pid)), f"the {start_method}ed engine process outlived its worker"
    # The resource tracker is spared, so it unlinks what the killed engine left in /dev/shm.
    assert not Path("/dev/shm", name).exists(), "the engine's shared memory was left behind"
