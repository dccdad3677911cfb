"""`make run`: Redis (unless REDIS_URL is set), the gateway on localhost:50051 and one CPU worker.

Runs in the foreground; Ctrl-C stops everything. Settings not given in the
environment take the defaults of gateway/config.py and worker/config.py.
"""

import os
import signal
import sys
import time
from pathlib import Path

from devstack.processes import REPO, launch, stop, wait_serving
from devstack.redis_server import RedisServer

RUN_DIR = REPO / ".run"
LOCAL_REDIS_PORT = 6390


def main() -> None:
    redis: RedisServer | None = None
    env: dict[str, str] = {}
    if not os.environ.get("REDIS_URL"):
        redis = RedisServer(RUN_DIR / "redis", port=LOCAL_REDIS_PORT, appendonly=True)
        redis.start()
        env["REDIS_URL"] = redis.url
        print(f"redis-server on {redis.url} (data in {redis.data_dir})", flush=True)
    gateway = launch("gateway", env)
    worker = launch("worker", env)
    children = [gateway, worker]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        address = os.environ.get("GATEWAY_ADDRESS", "[::]:50051").replace("[::]", "localhost")
        wait_serving(address, gateway)
        print(f"gateway serving chat.v1.ChatService on {address}; Ctrl-C stops the stack", flush=True)
        while all(p.poll() is None for p in children):
            time.sleep(0.5)
        failed = next(p for p in children if p.poll() is not None)
        sys.exit(f"{'gateway' if failed is gateway else 'worker'} exited with {failed.returncode}")
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        for process in children:
            stop(process)
        if redis is not None:
            redis.stop()


if __name__ == "__main__":
    RUN_DIR.mkdir(exist_ok=True)
    Path(RUN_DIR / ".gitignore").write_text("*\n")
    main()
