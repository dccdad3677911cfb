"""Idempotency keys: a retried call gets the answer of its first attempt, not a second job.

A caller names a logical call with an `Idempotency-Key` HTTP header or `idempotency-key`
gRPC metadata and sends the same key with every retry of it (chat_client does). Per API key
(or among all callers while auth is off), the first call with a key claims it in Redis,
atomically, before the rate limiter counts anything, and runs as usual; when its job
finishes, its answer is stored under the key before the caller is sent the end of it. A
retry of the same request then gets that answer, with the same completion id, from any
gateway, and is neither queued nor charged; while the first call still runs, the retry waits
for it (up to its own deadline). A different request under the same key is refused.

Only finished answers are kept, for GATEWAY_IDEMPOTENCY_WINDOW_SECONDS after they were
stored. A first call that ends without one (its caller left, its deadline, an error) gives
the key up, and the next retry runs the request anew (charged only what the engine
generated the first time): an error is no answer to repeat, and a retry is what the caller
wants after one.

Why store the answer and poll rather than attach to the running job's events: those go to
the reply stream of the gateway that queued the job, which trims them as it reads, so a
retry on another gateway, or after the first call's gateway gave up, could not read them.
An answer is bounded by max_tokens, and a waiting retry costs Redis one script call per
poll. The price: a retry that waits for a running job gets the whole reply when the job
finishes, as one piece of text (a stream retried gets one chunk), not token by token; and
a first call whose caller leaves gives the key up, so a retry waiting then runs the request
anew rather than taking the abandoned job over. If the gateway running the first call dies,
its key is freed once that gateway's reply stream has expired (10 s), and a retry runs anew.
"""

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, RedisError

from common import keys
from gateway.errors import IdempotencyConflict, InvalidField, RedisOutOfMemory, Unavailable

log = logging.getLogger(__name__)

METADATA_KEY = "idempotency-key"  # gRPC metadata; HTTP's Idempotency-Key header arrives as this
MAX_KEY_CHARS = 255
_POLL_SECONDS = 0.1  # how often a retry looks for the answer of a call still running

# KEYS: the key's record. ARGV: request hash, owner token, time to live (ms) while unanswered,
# the owner's gateway's reply stream. Claims an unknown key for the owner; returns nil then,
# else {request hash, answer or nil, the owning gateway's reply stream}.
_CLAIM = """
local found = redis.call('HMGET', KEYS[1], 'body', 'answer', 'gateway')
if found[1] then return found end
redis.call('HSET', KEYS[1], 'body', ARGV[1], 'owner', ARGV[2], 'gateway', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return nil
"""
# KEYS: the record, the reply stream of the gateway that owns it. Frees an unanswered key whose
# gateway is gone: a reply stream expires 10 s after its gateway stopped (gateway/queue.py), and
# its calls with it, so a retry need not wait for the dead call's deadline.
_FREE_ORPHAN = """
if redis.call('HGET', KEYS[1], 'gateway') == KEYS[2] and redis.call('HEXISTS', KEYS[1], 'answer') == 0
    and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
end
"""
# KEYS: the record. ARGV: owner token, answer (JSON), window (ms). Only the owner answers.
_ANSWER = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'answer', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
# KEYS: the record. ARGV: owner token. Gives an unanswered key up, if this call still owns it.
_GIVE_UP = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'answer') == 0 then
  redis.call('DEL', KEYS[1])
end
"""


@dataclass(frozen=True)
class Answer:
    """What a finished call told its caller; a retry is told the same."""

    request_id: str
    created: int
    model: str
    text: str
    finish_reason: str
    system_fingerprint: str
    prompt_tokens: int
    completion_tokens: int
    queue_time: float
    prompt_time: float
    completion_time: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> "Answer":
        return cls(**json.loads(data))


@dataclass(frozen=True)
class Claim:
    """This call owns its idempotency key: it runs the request, then answers or gives the key up."""

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
        self._window_ms = int(window_seconds * 1000)
        # This gateway's reply stream: it lives exactly as long as the gateway can finish calls.
        self._reply_stream = keys.reply_stream(gateway_id)
        self._claim = redis.register_script(_CLAIM)
        self._free_orphan = redis.register_script(_FREE_ORPHAN)
        self._answer = redis.register_script(_ANSWER)
        self._give_up = redis.register_script(_GIVE_UP)

    async def claim_or_wait(
        self, key: str, scope: str, request: bytes, running_seconds: float
    ) -> Claim | Answer:
        """Claims the key for this call, or returns the answer of the call that has it (waiting for
        it while it runs; the caller bounds the wait). Raises IdempotencyConflict when the key was
        used with another request.

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
                stored_body, answer, gateway = found
                if bytes(stored_body).decode() != body:
                    raise IdempotencyConflict(key)
                if answer is not None:
                    return Answer.from_json(answer)
                if gateway is not None:  # the first call is still running, unless its gateway died
                    await self._free_orphan(keys=[record, bytes(gateway).decode()])
            except OutOfMemoryError as exc:
                raise RedisOutOfMemory("cannot record the idempotency key") from exc
            except RedisError as exc:
                log.warning("cannot check idempotency key %s: %s", record, exc)
                raise Unavailable("cannot check the idempotency key; retry the request") from exc
            await asyncio.sleep(_POLL_SECONDS)

    async def answer(self, claim: Claim, answer: Answer) -> bool:
        """Stores the call's answer for retries; False when it could not (the key is then given up)."""
        try:
            return bool(
                await self._answer(keys=[claim.record], args=[claim.owner, answer.to_json(), self._window_ms])
            )
        except RedisError as exc:
            log.warning("cannot store the answer of request %s for retries: %s", answer.request_id, exc)
            return False

    async def give_up(self, claim: Claim) -> None:
        """Frees the key of a call that ended without an answer, so that a retry runs anew."""
        try:
            await self._give_up(keys=[claim.record], args=[claim.owner])
        except RedisError as exc:  # the claim expires after the call's deadline anyway
            log.warning("cannot give up idempotency record %s: %s", claim.record, exc)
