"""Encoding and decoding of the queue wire format (proto/chat/queue/v1/queue.proto).

The only module that turns Job and Event messages, and a job's progress record, into
bytes and back. Decoding never raises anything but BadPayload, so a malformed entry in
Redis cannot crash a process.
"""

import struct
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from chat.queue.v1 import queue_pb2

Job = queue_pb2.Job
Event = queue_pb2.Event
SamplingParams = queue_pb2.SamplingParams
ToolUse = queue_pb2.ToolUse
ToolCall = queue_pb2.ToolCall
FailureKind = queue_pb2.FailureKind
Started = queue_pb2.Started
Delta = queue_pb2.Delta
TokenLogprob = queue_pb2.TokenLogprob
Finished = queue_pb2.Finished
Failed = queue_pb2.Failed


class BadPayload(ValueError):
    """Bytes in Redis that are not a valid message of the expected type."""


def encode(message: Job | Event) -> bytes:
    return message.SerializeToString()


def decode_job(data: bytes) -> Job:
    job = Job()
    _parse(job, data)
    if not job.request_id or not job.reply_to:
        raise BadPayload("job lacks request_id or reply_to")
    return job


def decode_event(data: bytes) -> Event:
    event = Event()
    _parse(event, data)
    if not event.request_id or event.WhichOneof("kind") is None:
        raise BadPayload("event lacks request_id or kind")
    return event


def _parse(message: Job | Event, data: bytes) -> None:
    try:
        message.ParseFromString(data)
    except (DecodeError, TypeError) as exc:
        raise BadPayload(f"cannot decode {type(message).__name__}: {exc}") from exc


# A job's progress record (common/keys.py progress()) is one Redis string: a fixed-width
# ASCII header, then the generated token ids as 4-byte little-endian integers. Fixed width,
# so a worker updates the header in place (SETRANGE) and appends tokens (APPEND) in O(1)
# per step; ASCII, so the Lua script that fences stale writers (worker/publisher.py) can
# read the attempt with tonumber(). Fields: attempt, seq of the last event published,
# characters of text published.
PROGRESS_FIELD_WIDTH = 10
PROGRESS_HEADER_BYTES = 3 * PROGRESS_FIELD_WIDTH
_TOKEN = struct.Struct("<I")
PROGRESS_TOKEN_BYTES = _TOKEN.size  # so a record's length alone tells how many tokens it holds


@dataclass(frozen=True)
class Progress:
    """What a job's earlier attempts published: enough for another worker to continue it."""

    attempt: int
    last_seq: int  # seq of the last event published
    released_chars: int  # characters of text published (tokens may be ahead: held back text)
    token_ids: tuple[int, ...]  # every token generated, in order


def encode_progress_header(attempt: int, last_seq: int, released_chars: int) -> bytes:
    return b"".join(_progress_field(f) for f in (attempt, last_seq, released_chars))


def encode_progress_attempt(attempt: int) -> bytes:
    """The header's first field alone, to hand a record to a new attempt in place (SETRANGE 0)."""
    return _progress_field(attempt)


def _progress_field(value: int) -> bytes:
    return b"%0*d" % (PROGRESS_FIELD_WIDTH, value)


def encode_token_ids(token_ids: tuple[int, ...] | list[int]) -> bytes:
    return struct.pack(f"<{len(token_ids)}I", *token_ids)


def decode_progress(data: bytes) -> Progress:
    header, tokens = data[:PROGRESS_HEADER_BYTES], data[PROGRESS_HEADER_BYTES:]
    w = PROGRESS_FIELD_WIDTH
    try:
        attempt, last_seq, released = (int(header[i : i + w]) for i in range(0, PROGRESS_HEADER_BYTES, w))
    except ValueError as exc:
        raise BadPayload(f"cannot decode a progress record: {exc}") from exc
    if len(header) != PROGRESS_HEADER_BYTES or len(tokens) % _TOKEN.size:
        raise BadPayload(f"a progress record of {len(data)} bytes is truncated")
    token_ids = tuple(t for (t,) in _TOKEN.iter_unpack(tokens))
    return Progress(attempt, last_seq, released, token_ids)
