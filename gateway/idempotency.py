"""Idempotency keys: a retried call attaches to the job of its first attempt, not a second job.

A caller names a logical call with an `Idempotency-Key` HTTP header or `idempotency-key`
gRPC metadata and sends the same key with every retry of it (chat_client does). Per API key
(or among all callers while auth is off), the first call with a key claims it in Redis,
atomically, before the rate limiter counts anything, and runs as usual; once its job is
queued, the key points at it. A retry of the same request, on any gateway, then attaches to
that job through its completion log (gateway/completion_log.py): the same mechanism a resumed
stream uses, with its cursor at the start. It gets the job's reply as it is generated, with
the same completion id, whether the job still runs or finished, and is neither queued nor
charged. A different request under the same key is refused.

A finished call keeps its key for GATEWAY_IDEMPOTENCY_WINDOW_SECONDS (and its log at least as
long). A first call that ends in an error gives the key up, and the next retry runs the
request anew (charged only what the engine generated the first time): an error is no answer
to repeat, and a retry is what the caller wants after one. A first call whose caller left
keeps the key while its job runs on (gateway/relay.py), so the retry attaches to it. If the
gateway running the first call dies, its key is freed once that gateway's reply stream has
expired (10 s; its workers drop the job then), and a retry runs anew.
"""

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, RedisError

from common import keys
from gateway.errors import IdempotencyConflict, InvalidField, RedisOutOfMemory, Unavailable

log = logging.getLogger(__name__)

METADATA_KEY = "idempotency-key"  # gRPC metadata; HTTP's Idempotency-Key header arrives as this
MAX_KEY_CHARS = 255
_POLL_SECONDS = 0.1  # how often a retry looks for the job of a call still being admitted

# KEYS: the key's record. ARGV: request hash, owner token, time to live (ms) while unanswered,
# the owner's gateway's reply stream. Claims an unknown key for the owner; returns nil then,
# else {request hash, the request id of its job (nil until queued), the owning gateway's reply
# stream, whether the job finished}.
_CLAIM = """
local found = redis.call('HMGET', KEYS[1], 'body', 'job', 'gateway', 'kept')
if found[1] then return found end
redis.call('HSET', KEYS[1], 'body', ARGV[1], 'owner', ARGV[2], 'gateway', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return nil
"""
# KEYS: the record. ARGV: the reply stream of the gateway that owns it, found gone. Frees a key
# whose call has not finished and whose gateway is gone: a reply stream expires 10 s after its
# gateway stopped (gateway/queue.py), and workers drop its jobs then: a retry runs anew rather
# than attach to a job that ends failed. Returns 1 when it freed the key. (The reply stream lives
# in its gateway's slot, not the record's, so its absence is read before, by the caller.)
_FREE_ORPHAN = """
if redis.call('HGET', KEYS[1], 'gateway') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'kept') == 0 then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: the record. ARGV: owner token, the job's request id. Points the key at the owner's job.
_BIND = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'job', ARGV[2])
return 1
"""
# KEYS: the record. ARGV: owner token, window (ms), the job's request id. The owner's job finished:
# keep the key, pointing at the job (again: a bind whose reply was lost must not leave it blind).
_KEEP = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'kept', '1', 'job', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# KEYS: the record. ARGV: owner token. Gives an unfinished key up, if this call still owns it.
_GIVE_UP = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'kept') == 0 then
  redis.call('DEL', KEYS[1])
end
"""


@dataclass(frozen=True)
class Attach:
    """The key's first call queued this job: a retry attaches to it."""

    request_id: str


@dataclass(frozen=True)
class Claim:
    """This call owns its idempotency key: it runs the request, then keeps the key or gives it up."""

    record: str  # the Redis key
    owner: str  # this call's token


def idempotency_key(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The caller's idempotency key from its metadata; None when it sent none (or an empty one)."""
    for name, value in metadata:
        if name != METADATA_KEY:
            continue
        key = value.decode(errors="replace") if isinstance(value, bytes) else value
        if not key:
            return None
        if len(key) > MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
            raise InvalidField(METADATA_KEY, f"must be 1 to {MAX_KEY_CHARS} printable ASCII characters")
        return key
    return None


class IdempotencyKeys:
    def __init__(self, redis: Redis, window_seconds: float, gateway_id: str) -> None:
        self._redis = redis
        self._window_ms = int(window_seconds * 1000)
        # This gateway's reply stream: it lives exactly as long as the gateway can finish calls.
        self._reply_stream = keys.reply_stream(gateway_id)
        self._claim = redis.register_script(_CLAIM)
        self._free_orphan = redis.register_script(_FREE_ORPHAN)
        self._bind = redis.register_script(_BIND)
        self._keep = redis.register_script(_KEEP)
        self._give_up = redis.register_script(_GIVE_UP)

    async def claim_or_wait(
        self, key: str, scope: str, request: bytes, running_seconds: float
    ) -> Claim | Attach:
        """Claims the key for this call, or returns the job of the call that has it (waiting while
        that call is admitted; the caller bounds the wait). Raises IdempotencyConflict when the key
        was used with another request.

        running_seconds: how long the claim holds without an answer (the call's deadline, so a
        gateway that dies mid-call cannot hold the key for the whole window).
        """
        record = keys.idempotency(scope, hashlib.sha256(key.encode()).hexdigest())
        body = hashlib.sha256(request).hexdigest()
        claim = Claim(record, uuid.uuid4().hex)
        ttl_ms = max(1000, int(running_seconds * 1000) + 5000)
        while True:
            try:
                try:
                    found = await self._claim(
                        keys=[record], args=[body, claim.owner, ttl_ms, self._reply_stream]
                    )
                except asyncio.CancelledError:
                    # The script may have claimed the key for this call, which will never learn it:
                    # give it up (only if ours), or a retry would wait for it to our deadline.
                    await asyncio.shield(self.give_up(claim))
                    raise
                if found is None:
                    return claim
                stored_body, job, gateway, kept = found
                if bytes(stored_body).decode() != body:
                    raise IdempotencyConflict(key)
                # The first call is being admitted or runs, unless its gateway died: then its key
                # is freed and this call claims it on the next round.
                if gateway is not None and kept is None and await self._free_if_orphan(record, gateway):
                    continue
                if job is not None:
                    return Attach(bytes(job).decode())
            except OutOfMemoryError as exc:
                raise RedisOutOfMemory("cannot record the idempotency key") from exc
            except RedisError as exc:
                log.warning("cannot check idempotency key %s: %s", record, exc)
                raise Unavailable("cannot check the idempotency key; retry the request") from exc
            await asyncio.sleep(_POLL_SECONDS)

    async def _free_if_orphan(self, record: str, gateway: bytes) -> bool:
        """Frees the key if the gateway of its unfinished call is gone; returns whether it did."""
        reply_stream = bytes(gateway).decode()
        if await self._redis.exists(reply_stream):
            return False
        return bool(await self._free_orphan(keys=[record], args=[reply_stream]))

    async def bind(self, claim: Claim, request_id: str) -> None:
        """Points the key at the job its call queued, so that retries attach to that job."""
        try:
            await self._bind(keys=[claim.record], args=[claim.owner, request_id])
        except RedisError as exc:  # a retry then waits for the call (or its deadline) instead
            log.warning("cannot point idempotency record %s at job %s: %s", claim.record, request_id, exc)

    async def keep(self, claim: Claim, request_id: str) -> bool:
        """The call's job finished: retries within the window attach to it. False when it could not."""
        try:
            args: list[str | int] = [claim.owner, self._window_ms, request_id]
            return bool(await self._keep(keys=[claim.record], args=args))
        except RedisError as exc:
            log.warning("cannot keep idempotency record %s for retries: %s", claim.record, exc)
            return False

    async def give_up(self, claim: Claim) -> None:
        """Frees the key of a call that ended without a finished job, so that a retry runs anew."""
        try:
            await self._give_up(keys=[claim.record], args=[claim.owner])
        except RedisError as exc:  # the claim expires after the call's deadline anyway
            log.warning("cannot give up idempotency record %s: %s", claim.record, exc)
