"""Requests and tokens per minute per API key, enforced atomically in Redis.

Every gateway replica runs the same Lua script on the same per-minute window, so the
limits hold across replicas. At admission a call counts one request and reserves its
prompt tokens plus max_tokens; when it ends, however it ends, the tokens the engine did
not generate are given back, so the window holds prompt + completion tokens of every call.
A call that never reached a worker (its submit was refused, or it never left the queue)
gives back its request and all its tokens: the overload that refused it must not also use
up the budget of the retries that follow.
"""

import contextlib
import math
import time
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, RedisError

from common import keys
from gateway.apikeys import KeyRecord
from gateway.errors import RateLimited, RedisOutOfMemory, Unavailable

# Both scripts are idempotent per call: each call brings its own token, and the applied marker
# (KEYS[2]) makes a retry of a call that Redis already ran (its reply timed out) change nothing.

# KEYS: window hash, applied marker. ARGV: requests per minute, tokens per minute (0 = no limit),
# tokens, marker TTL. Returns {admitted, requests used, tokens used}.
_ADMIT = """
local done = redis.call('GET', KEYS[2])
if done then return cjson.decode(done) end
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local used_requests = tonumber(redis.call('HGET', KEYS[1], 'requests') or '0')
local used_tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
if (rpm > 0 and used_requests + 1 > rpm) or (tpm > 0 and used_tokens + tokens > tpm) then
  return {0, used_requests, used_tokens}
end
redis.call('HINCRBY', KEYS[1], 'requests', 1)
redis.call('HINCRBY', KEYS[1], 'tokens', tokens)
redis.call('EXPIRE', KEYS[1], 120)
local admitted = {1, used_requests + 1, used_tokens + tokens}
redis.call('SET', KEYS[2], cjson.encode(admitted), 'EX', ARGV[4])
return admitted
"""

# KEYS: window hash, applied marker. ARGV: tokens to give back, marker TTL, requests to give
# back (0 or 1). A window that has expired is not recreated (it would have no TTL).
_REFUND = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'tokens', -tonumber(ARGV[1]))
  redis.call('HINCRBY', KEYS[1], 'requests', -tonumber(ARGV[3]))
end
"""
# KEYS: window hash. ARGV: its TTL. Counts one request, and the TTL in the same step, so that no
# window lives for ever.
_COUNT_REQUEST = """
redis.call('HINCRBY', KEYS[1], 'requests', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""
_WINDOW_SECONDS = 60


@dataclass(frozen=True)
class Budget:
    """What a key has left in the current window; sent to the caller as x-ratelimit-* metadata."""

    record: KeyRecord
    window: int
    used_requests: int
    used_tokens: int
    reset_seconds: float
    reserved_tokens: int = 0  # what this call reserved: its prompt plus max_tokens

    def metadata(self) -> tuple[tuple[str, str], ...]:
        rpm, tpm = self.record.requests_per_minute, self.record.tokens_per_minute
        reset = f"{math.ceil(self.reset_seconds)}s"
        fields: list[tuple[str, str]] = []
        if rpm:
            fields += [
                ("x-ratelimit-limit-requests", str(rpm)),
                ("x-ratelimit-remaining-requests", str(max(0, rpm - self.used_requests))),
                ("x-ratelimit-reset-requests", reset),
            ]
        if tpm:
            fields += [
                ("x-ratelimit-limit-tokens", str(tpm)),
                ("x-ratelimit-remaining-tokens", str(max(0, tpm - self.used_tokens))),
                ("x-ratelimit-reset-tokens", reset),
            ]
        return tuple(fields)


class RateLimiter:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._admit = redis.register_script(_ADMIT)
        self._refund = redis.register_script(_REFUND)
        self._count_request = redis.register_script(_COUNT_REQUEST)

    async def admit(self, record: KeyRecord, tokens: int) -> Budget:
        """Counts a call and reserves its tokens, or raises RateLimited with the time to wait."""
        now = time.time()
        window = int(now // _WINDOW_SECONDS)
        reset = (window + 1) * _WINDOW_SECONDS - now
        window_key = keys.rate_window(record.digest, window)
        try:
            admitted, used_requests, used_tokens = await self._admit(
                keys=[window_key, keys.applied(window_key, uuid.uuid4().hex)],
                args=[
                    record.requests_per_minute,
                    record.tokens_per_minute,
                    tokens,
                    keys.RETRY_MARKER_TTL_SECONDS,
                ],
            )
        except OutOfMemoryError as exc:
            raise RedisOutOfMemory("cannot count the call against its rate limit") from exc
        except RedisError as exc:
            raise Unavailable.hiding("cannot check the rate limit", exc) from exc
        budget = Budget(record, window, int(used_requests), int(used_tokens), reset, tokens)
        if not admitted:
            what = (
                "requests"
                if record.requests_per_minute and used_requests + 1 > record.requests_per_minute
                else "tokens"
            )
            raise RateLimited(
                f"API key {record.name!r} is over its {what} per minute limit; retry in {math.ceil(reset)}s",
                reset,
                budget.metadata(),
            )
        return budget

    async def check_requests(self, record: KeyRecord) -> None:
        """Raises RateLimited when the key has no request left in this window; counts nothing.

        One read, so that a key over its limit is refused before its request costs any work
        (parsing, tokenizing); admit() checks again, atomically, once the call's tokens are known.
        """
        if not record.requests_per_minute:
            return
        now = time.time()
        window = int(now // _WINDOW_SECONDS)
        try:
            used = await self._redis.hmget(keys.rate_window(record.digest, window), ["requests", "tokens"])
        except RedisError as exc:
            raise Unavailable.hiding("cannot check the rate limit", exc) from exc
        used_requests, used_tokens = (int(v or 0) for v in used)
        if used_requests >= record.requests_per_minute:
            reset = (window + 1) * _WINDOW_SECONDS - now
            budget = Budget(record, window, used_requests, used_tokens, reset)
            raise RateLimited(
                f"API key {record.name!r} is over its requests per minute limit;"
                f" retry in {math.ceil(reset)}s",
                reset,
                budget.metadata(),
            )

    async def count_refused(self, record: KeyRecord) -> None:
        """Counts a request refused after it cost work (an invalid prompt, tokenized to tell)
        against the key's requests per minute, so that invalid requests meet the limit too."""
        if not record.requests_per_minute:
            return
        window = keys.rate_window(record.digest, int(time.time() // _WINDOW_SECONDS))
        with contextlib.suppress(RedisError):  # the request is refused anyway
            await self._count_request(keys=[window], args=[2 * _WINDOW_SECONDS])

    async def refund(self, budget: Budget, tokens: int, requests: int = 0) -> None:
        """Gives back reserved tokens a call did not use, and its request when it never reached a
        worker (only within the same window: an older one no longer limits anybody)."""
        if (tokens <= 0 and requests <= 0) or int(time.time() // _WINDOW_SECONDS) != budget.window:
            return
        window = keys.rate_window(budget.record.digest, budget.window)
        with contextlib.suppress(RedisError):  # the window expires anyway
            await self._refund(
                keys=[window, keys.applied(window, uuid.uuid4().hex)],
                args=[max(0, tokens), keys.RETRY_MARKER_TTL_SECONDS, max(0, requests)],
            )
