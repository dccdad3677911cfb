"""Launching gateway and worker processes and waiting until they serve."""

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def launch(module: str, env: Mapping[str, str], log_file: Path | None = None) -> subprocess.Popen[bytes]:
    """Starts `python -m module` with the current interpreter and extra environment."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - handed to the child
    return subprocess.Popen([sys.executable, "-m", module], cwd=REPO, env=full_env, stdout=out, stderr=out)


def wait_serving(
    target: str,
    process: subprocess.Popen[bytes],
    timeout: float = 120.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Waits until the gateway at target reports SERVING through grpc.health.v1."""
    end = time.monotonic() + timeout
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"gateway at {target} not serving after {timeout}s")


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def serve_until_interrupted(topology: Any, note: str = "") -> None:
    """Starts a Redis topology (devstack/redis_sentinel.py, redis_cluster.py), prints the REDIS_URL
    that reaches it, for `REDIS_URL=<url> make run` in another shell, and stops it on Ctrl-C."""
    started = time.monotonic()
    topology.start()
    print(f"REDIS_URL={topology.url}  (up in {time.monotonic() - started:.1f}s{note})", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        topology.stop()
