"""`make run`: Redis (unless REDIS_URL is set), the gateway on localhost:50051 and one vLLM worker.

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
# The model name the reference's examples ask for, served by the bundled model, so they run
# unchanged (examples/groq/). Only with the default GATEWAY_MODELS, which it must name.
REFERENCE_MODEL_ALIASES = "mixtral-8x7b-32768=SmolLM2-135M-Instruct"
WORKER_START_GRACE_SECONDS = 120


def main() -> None:
    redis: RedisServer | None = None
    env: dict[str, str] = {}
    if not os.environ.get("REDIS_URL"):
        redis = RedisServer(RUN_DIR / "redis", port=LOCAL_REDIS_PORT, appendonly=True)
        redis.start()
        env["REDIS_URL"] = redis.url
        print(f"redis-server on {redis.url} (data in {redis.data_dir})", flush=True)
    if not os.environ.get("GATEWAY_MODELS") and not os.environ.get("GATEWAY_MODEL_ALIASES"):
        env["GATEWAY_MODEL_ALIASES"] = REFERENCE_MODEL_ALIASES
    if not os.environ.get("GATEWAY_NO_WORKER_GRACE_SECONDS"):
        # The worker loads its engine for 15-20 s after the gateway starts: a call made meanwhile
        # waits for it, rather than being refused for want of a live worker.
        env["GATEWAY_NO_WORKER_GRACE_SECONDS"] = str(WORKER_START_GRACE_SECONDS)
    gateway = launch("gateway", env)
    worker = launch("worker", env)
    children = [gateway, worker]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        address = os.environ.get("GATEWAY_ADDRESS", "[::]:50051").replace("[::]", "localhost")
        wait_serving(address, gateway)
        http = os.environ.get("GATEWAY_HTTP_ADDRESS", ":8080")
        print(f"gateway serving chat.v1.ChatService on {address}; Ctrl-C stops the stack", flush=True)
        print(
            f"HTTP API (Groq/OpenAI dialect): GROQ_BASE_URL=http://localhost{http[http.rfind(':') :]}",
            flush=True,
        )
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
