"""Who is calling: API keys from `authorization: Bearer <key>` metadata (GATEWAY_AUTH=on).

Keys are looked up by their SHA-256 in Redis (gateway/apikeys.py writes them) and
trusted for GATEWAY_AUTH_CACHE_SECONDS, so a revocation takes effect within that time.
Key values never reach logs: only the key's name does.
"""

import time
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common import keys
from gateway.apikeys import KeyRecord, digest
from gateway.errors import PermissionDenied, Unauthenticated, Unavailable


class Authenticator:
    def __init__(self, redis: Redis, cache_seconds: float) -> None:
        self._redis = redis
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[KeyRecord | None, float]] = {}

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]], model: str | None) -> KeyRecord:
        """The caller's key record; raises Unauthenticated or PermissionDenied.

        model None (a request too malformed to name one) checks the key alone.
        """
        header = next((str(v) for k, v in metadata if k == "authorization"), "")
        scheme, _, api_key = header.partition(" ")
        if scheme.lower() != "bearer" or not api_key.strip():
            raise Unauthenticated("missing API key: send `authorization: Bearer <key>` metadata")
        record = await self._lookup(digest(api_key.strip()))
        if record is None:
            raise Unauthenticated("unknown API key")
        if record.revoked:
            raise PermissionDenied(f"API key {record.name!r} has been revoked")
        if model is not None and not record.may_use(model):
            raise PermissionDenied(f"API key {record.name!r} may not use model {model!r}")
        return record

    async def _lookup(self, key_digest: str) -> KeyRecord | None:
        now = time.monotonic()
        cached = self._cache.get(key_digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            fields = await self._redis.hgetall(keys.api_key(key_digest))
        except RedisError as exc:
            raise Unavailable.hiding("cannot check the API key", exc) from exc
        record = KeyRecord.from_hash(fields, key_digest) if fields else None
        if len(self._cache) > 10_000:  # unknown keys must not grow it without bound
            self._cache.clear()
        self._cache[key_digest] = (record, now + self._cache_seconds)
        return record
