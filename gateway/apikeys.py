"""API keys: stored hashed in Redis, managed from the command line.

    python -m gateway.apikeys create --name billing --models SmolLM2-135M-Instruct --rpm 60 --tpm 100000
    python -m gateway.apikeys create --name nightly-batch --tier flex
    python -m gateway.apikeys list
    python -m gateway.apikeys revoke --name billing

`create` prints the key once; only its SHA-256 is stored. Callers send it as
`authorization: Bearer <key>` metadata. REDIS_URL selects the Redis.
"""

import argparse
import asyncio
import hashlib
import os
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from common import keys
from common.redis_client import connect
from gateway.tiers import ON_DEMAND, TIERS

KEY_PREFIX = "sk-chat-"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    name: str
    models: tuple[str, ...]  # ("*",) means every model
    requests_per_minute: int  # 0 = unlimited
    tokens_per_minute: int  # 0 = unlimited
    revoked: bool
    digest: str
    # The tier of the key's requests that name none (or "auto", or the openai SDK's "default"):
    # "on_demand", or "flex" for batch work that should yield to interactive calls.
    service_tier: str = ON_DEMAND

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    @classmethod
    def from_hash(cls, fields: Mapping[Any, Any], key_digest: str) -> "KeyRecord":
        text = {_text(k): _text(v) for k, v in fields.items()}
        return cls(
            name=text["name"],
            models=tuple(m for m in text.get("models", "*").split(",") if m),
            requests_per_minute=int(text.get("rpm", "0")),
            tokens_per_minute=int(text.get("tpm", "0")),
            revoked=text.get("revoked", "0") == "1",
            digest=key_digest,
            # A value edited by hand that is no tier serves on demand rather than failing every call.
            service_tier=tier if (tier := text.get("tier", ON_DEMAND)) in TIERS else ON_DEMAND,
        )


async def create(
    redis: Redis, name: str, models: list[str], rpm: int, tpm: int, service_tier: str = ON_DEMAND
) -> str:
    if service_tier not in TIERS:
        raise ValueError(f"--tier must be one of {', '.join(TIERS)}, got {service_tier!r}")
    if await redis.hexists(keys.API_KEY_NAMES, name):
        raise ValueError(f"a key named {name!r} exists; revoke it or choose another name")
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_digest = digest(api_key)
    record = {"name": name, "models": ",".join(models) or "*", "rpm": rpm, "tpm": tpm, "revoked": 0}
    record["tier"] = service_tier
    record["created"] = int(time.time())
    # Record first, then its name: two slots on Redis Cluster, so not one transaction. A crash
    # between leaves a record whose key was never printed (nobody holds it), and the name free.
    await redis.hset(keys.api_key(key_digest), mapping=record)  # type: ignore[arg-type]
    await redis.hset(keys.API_KEY_NAMES, name, key_digest)
    return api_key


async def list_keys(redis: Redis) -> list[KeyRecord]:
    names = await redis.hgetall(keys.API_KEY_NAMES)
    records = []
    for key_digest in sorted(_text(d) for d in names.values()):
        fields = await redis.hgetall(keys.api_key(key_digest))
        if fields:
            records.append(KeyRecord.from_hash(fields, key_digest))
    return sorted(records, key=lambda r: r.name)


async def revoke(redis: Redis, name: str) -> None:
    key_digest = await redis.hget(keys.API_KEY_NAMES, name)
    if key_digest is None:
        raise ValueError(f"no key named {name!r}")
    await redis.hset(keys.api_key(_text(key_digest)), "revoked", 1)


async def _main(args: argparse.Namespace) -> None:
    # connect(): any REDIS_URL the gateway takes, a Sentinel one included.
    redis = connect(
        os.environ.get("REDIS_URL") or "redis://localhost:6379/0", os.environ.get("REDIS_TLS_CA_FILE", "")
    )
    try:
        if args.command == "create":
            models = [m for m in args.models.split(",") if m]
            print(await create(redis, args.name, models, args.rpm, args.tpm, args.tier))
            print("Store this key now: it is not shown again.", file=sys.stderr)
        elif args.command == "list":
            for r in await list_keys(redis):
                state = "revoked" if r.revoked else "active"
                print(
                    f"{r.name}\t{state}\tmodels={','.join(r.models)}\trpm={r.requests_per_minute}"
                    f"\ttpm={r.tokens_per_minute}\ttier={r.service_tier}"
                )
        else:
            await revoke(redis, args.name)
            print(f"revoked {args.name}")
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("create", help="create a key and print it once")
    new.add_argument("--name", required=True)
    new.add_argument("--models", default="*", help="comma-separated model names, * for all")
    new.add_argument("--rpm", type=int, default=0, help="requests per minute, 0 = unlimited")
    new.add_argument(
        "--tpm", type=int, default=0, help="prompt + completion tokens per minute, 0 = unlimited"
    )
    new.add_argument(
        "--tier", default=ON_DEMAND, choices=TIERS, help="service tier of requests that name none"
    )
    commands.add_parser("list", help="list keys (never the keys themselves)")
    gone = commands.add_parser("revoke", help="revoke a key by name")
    gone.add_argument("--name", required=True)
    try:
        asyncio.run(_main(parser.parse_args()))
    except ValueError as exc:
        sys.exit(f"apikeys: {exc}")


if __name__ == "__main__":
    main()
