"""Encoding and decoding of the queue wire format (proto/chat/queue/v1/queue.proto).

The only module that turns Job and Event messages into bytes and back. Decoding never
raises anything but BadPayload, so a malformed entry in Redis cannot crash a process.
"""

from google.protobuf.message import DecodeError

from chat.queue.v1 import queue_pb2

Job = queue_pb2.Job
Event = queue_pb2.Event
SamplingParams = queue_pb2.SamplingParams
FailureKind = queue_pb2.FailureKind
Started = queue_pb2.Started
Delta = queue_pb2.Delta
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
