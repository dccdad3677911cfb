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
"""

from dataclasses import dataclass

from redis.asyncio import Redis

from common import keys

# KEYS[1] engines hash; ARGV worker id, context window, time to live (ms), job streams read.
_ADVERTISE = """
local now = redis.call('TIME')
local expires = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({
  context_window = tonumber(ARGV[2]), expires_ms = expires, job_streams = tonumber(ARGV[4])}))
"""

# KEYS[1] engines hash. Removes expired or unreadable entries; returns the smallest live window
# and the fewest job streams a live worker reads (an entry without it: 1), or {-1, -1}.
_LIVE_ENGINES = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local entries = redis.call('HGETALL', KEYS[1])
local smallest, fewest = -1, -1
for i = 1, #entries, 2 do
  local ok, info = pcall(cjson.decode, entries[i + 1])
  local window = ok and type(info) == 'table' and tonumber(info.context_window)
  local expires = ok and type(info) == 'table' and tonumber(info.expires_ms)
  if window and expires and expires >= now_ms then
    local streams = tonumber(info.job_streams) or 1
    if smallest < 0 or window < smallest then smallest = window end
    if fewest < 0 or streams < fewest then fewest = streams end
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
return {smallest, fewest}
"""


@dataclass(frozen=True)
class LiveEngines:
    """What every live worker of a model can take."""

    context_window: int  # the smallest engine's
    job_streams: int  # the fewest job streams a worker reads


async def advertise(
    redis: Redis, model: str, worker_id: str, context_window: int, ttl: float, job_streams: int = 1
) -> None:
    script = redis.register_script(_ADVERTISE)
    await script(keys=[keys.engines(model)], args=[worker_id, context_window, int(ttl * 1000), job_streams])


async def withdraw(redis: Redis, model: str, worker_id: str) -> None:
    await redis.hdel(keys.engines(model), worker_id)


async def live_engines(redis: Redis, model: str) -> LiveEngines | None:
    """What the model's live workers can all take; None when none is live.

    Entries of workers that died without withdrawing (SIGKILL, lost node) are removed."""
    script = redis.register_script(_LIVE_ENGINES)
    smallest, fewest = (int(n) for n in await script(keys=[keys.engines(model)]))
    return LiveEngines(smallest, fewest) if smallest >= 0 else None
