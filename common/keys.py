"""Every Redis key and consumer-group name the service uses, in one place."""

PREFIX = "chat"

# Consumer group on every job stream; all workers of a model share it.
WORKER_GROUP = "workers"

# Field of a job-stream or reply-stream entry that holds the protobuf bytes.
PAYLOAD_FIELD = b"p"


def job_stream(model: str) -> str:
    """Stream of queued jobs for one model (consumer group WORKER_GROUP)."""
    return f"{PREFIX}:jobs:{model}"


def reply_stream(gateway_id: str) -> str:
    """Stream of events for every job of one gateway process; only that gateway reads it."""
    return f"{PREFIX}:replies:{gateway_id}"


def cancel_flag(request_id: str) -> str:
    """Set (with a TTL) when the caller of a job has gone; workers abort or skip the job."""
    return f"{PREFIX}:cancel:{request_id}"
