"""Shared pieces of the tests that drive gateway/queue.py against a real redis-server."""

import time
import uuid

from common import keys
from gateway.validation import ValidRequest


def valid_request(model: str = "") -> ValidRequest:
    """A request as validation would pass it, for a model of its own (its own job stream)."""
    return ValidRequest(
        model=model or f"test-{uuid.uuid4().hex[:8]}",
        prompt_token_ids=[1, 2, 3],
        temperature=1.0,
        top_p=1.0,
        max_tokens=4,
        seed=None,
        stop=(),
        json_mode=False,
        user="",
    )


def deadline(seconds: float = 30) -> float:
    return time.time() + seconds


def queued_request_ids(client: object, model: str) -> list[str]:
    """Request ids of the entries in the model's job stream, oldest first (sync redis client)."""
    entries = client.xrange(keys.job_stream(model))  # type: ignore[attr-defined]
    return [fields[keys.REQUEST_ID_FIELD].decode() for _id, fields in entries]
