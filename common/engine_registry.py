"""Workers tell gateways what their engines can take: one source for the context window.

The context window is what the engine really runs with (vLLM's max_model_len, which
WORKER_VLLM_MAX_MODEL_LEN or the KV cache size can make shorter than the model's own),
so only the worker knows it. Each worker keeps an entry in the model's hash in Redis,
refreshed with its heartbeat and stamped with an expiry; gateways read the smallest
window among live workers (a job can land on any of them) and validate against it.
Expiry is stamped and checked on Redis's clock, inside scripts, so clocks of workers and
gateways need not agree and a refresh cannot race with the removal of an expired entry.

Each entry also says how many job streams its worker reads (REDIS_JOB_STREAMS): gateways
queue only on streams every live worker reads, so a setting that differs between gateways
and workers (or a rolling change of it) strands no job.

And what cache-affine placement needs (gateway/placement.py): the worker's own job stream, its
engine's KV cache block size, and its load (sequences running, of how many), as of its last
heartbeat.
"""

import json
from dataclasses import dataclass, field

from redis.asyncio import Redis

from common import keys

# KEYS[1] engines hash; ARGV worker id, context window, time to live (ms), job streams read,
# and the placement fields as JSON (an object, possibly empty).
_ADVERTISE = """
local now = redis.call('TIME')
local expires = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[3])
local entry = cjson.decode(ARGV[5])
entry.context_window = tonumber(ARGV[2])
entry.expires_ms = expires
entry.job_streams = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
"""

# KEYS[1] engines hash. Removes expired or unreadable entries; returns the smallest live window
# and the fewest job streams a live worker reads (an entry without it: 1), or {-1, -1}; then
# each live worker's id and entry.
_LIVE_ENGINES = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local entries = redis.call('HGETALL', KEYS[1])
local smallest, fewest = -1, -1
local live = {}
for i = 1, #entries, 2 do
  local ok, info = pcall(cjson.decode, entries[i + 1])
  local window = ok and type(info) == 'table' and tonumber(info.context_window)
  local expires = ok and type(info) == 'table' and tonumber(info.expires_ms)
  if window and expires and expires >= now_ms then
    local streams = tonumber(info.job_streams) or 1
    if smallest < 0 or window < smallest then smallest = window end
    if fewest < 0 or streams < fewest then fewest = streams end
    table.insert(live, entries[i])
    table.insert(live, entries[i + 1])
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
local reply = {smallest, fewest}
for _, v in ipairs(live) do table.insert(reply, v) end
return reply
"""


@dataclass(frozen=True)
class WorkerLoad:
    """What a worker tells gateways for cache-affine placement, as of its last heartbeat."""

    stream: str  # its own job stream (common/keys.py worker_stream)
    block_size: int  # its engine's KV cache block: the prefix cache holds whole blocks only
    running: int  # sequences its engine runs
    capacity: int  # the most it runs (WORKER_MAX_CONCURRENCY)


@dataclass(frozen=True)
class LiveEngines:
    """What every live worker of a model can take."""

    context_window: int  # the smallest engine's
    job_streams: int  # the fewest job streams a worker reads
    # By worker id, those that advertise a stream of their own (workers older than placement don't).
    loads: dict[str, WorkerLoad] = field(default_factory=dict, compare=False)
    worker_ids: frozenset[str] = field(default=frozenset(), compare=False)  # every live worker


async def advertise(
    redis: Redis,
    model: str,
    worker_id: str,
    context_window: int,
    ttl: float,
    job_streams: int = 1,
    load: WorkerLoad | None = None,
) -> None:
    script = redis.register_script(_ADVERTISE)
    fields = (
        {
            "stream": load.stream,
            "block_size": load.block_size,
            "running": load.running,
            "capacity": load.capacity,
        }
        if load is not None
        else {}
    )
    await script(
        keys=[keys.engines(model)],
        args=[worker_id, context_window, int(ttl * 1000), job_streams, json.dumps(fields)],
    )


async def withdraw(redis: Redis, model: str, worker_id: str) -> None:
    await redis.hdel(keys.engines(model), worker_id)


async def live_engines(redis: Redis, model: str) -> LiveEngines | None:
    """What the model's live workers can all take; None when none is live.

    Entries of workers that died without withdrawing (SIGKILL, lost node) are removed."""
    script = redis.register_script(_LIVE_ENGINES)
    reply = await script(keys=[keys.engines(model)])
    smallest, fewest = int(reply[0]), int(reply[1])
    if smallest < 0:
        return None
    loads = {}
    for worker_id, entry in zip(reply[2::2], reply[3::2], strict=True):
        if (load := _load(entry)) is not None:
            loads[bytes(worker_id).decode()] = load
    ids = frozenset(bytes(worker_id).decode() for worker_id in reply[2::2])
    return LiveEngines(smallest, fewest, loads, ids)


def _load(entry: bytes) -> WorkerLoad | None:
    """The placement fields of a live entry; None for a worker that advertises none."""
    info = json.loads(entry)
    try:
        return WorkerLoad(
            stream=str(info["stream"]),
            block_size=int(info["block_size"]),
            running=int(info["running"]),
            capacity=int(info["capacity"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
