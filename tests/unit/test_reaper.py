"""The reaper's guard, on real processes (`sleep` stands in for vLLM's engine processes)."""

import subprocess
import time
from collections.abc import Iterator

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
