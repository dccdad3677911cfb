"""Every Redis key and consumer-group name the service uses, in one place."""

PREFIX = "chat"

# Consumer group on every job stream; all workers of a model share it.
WORKER_GROUP = "workers"

# Fields of a job-stream or reply-stream entry. The payload is the protobuf message;
# request id and reply stream are repeated in plain text so that an entry whose payload
# cannot be decoded can still be answered (job entries) or attributed (event entries).
PAYLOAD_FIELD = b"p"
REQUEST_ID_FIELD = b"r"
REPLY_TO_FIELD = b"g"


# Stream of jobs given up on (undecodable, or delivered too many times), for people to inspect.
def dead_letter_stream(model: str) -> str:
    return f"{PREFIX}:dead:{model}"


def job_stream(model: str) -> str:
    """Stream of queued jobs for one model (consumer group WORKER_GROUP)."""
    return f"{PREFIX}:jobs:{model}"


def reply_stream(gateway_id: str) -> str:
    """Stream of events for every job of one gateway process; only that gateway reads it."""
    return f"{PREFIX}:replies:{gateway_id}"


def cancel_flag(request_id: str) -> str:
    """Set (with a TTL) when the caller of a job has gone; workers abort or skip the job."""
    return f"{PREFIX}:cancel:{request_id}"


# How long a retry marker lives: far longer than a command's timeout plus its one retry.
RETRY_MARKER_TTL_SECONDS = 60


def submitted(request_id: str) -> str:
    """The entry id of a queued job, set by the submit script in the same step as its XADD.

    A submit that is retried after Redis ran it (the reply timed out) finds the marker and
    returns the same entry instead of queueing the job twice. Workers delete it with the job.
    """
    return f"{PREFIX}:submitted:{request_id}"


def applied(token: str) -> str:
    """Marks one rate-limit update (admit or refund) as applied, so its retry is not applied twice."""
    return f"{PREFIX}:applied:{token}"


def api_key(digest: str) -> str:
    """Hash of one API key's record (name, models, limits, revoked); `digest` is the key's SHA-256."""
    return f"{PREFIX}:apikey:{digest}"


# Hash of key name -> digest, to list and revoke keys by name.
API_KEY_NAMES = f"{PREFIX}:apikeys"


def rate_window(digest: str, minute: int) -> str:
    """Requests and tokens one API key used in one minute (expires after two)."""
    return f"{PREFIX}:ratelimit:{digest}:{minute}"


def engines(model: str) -> str:
    """Hash of worker id -> the engine it runs for the model (context window), refreshed while alive."""
    return f"{PREFIX}:engines:{model}"


def progress(request_id: str) -> str:
    """A running job's progress record (common/codec.py Progress): the tokens generated and the
    text and events published so far, written in the same step as its events, so a worker that
    takes the job over continues where the events stopped. Deleted with the job."""
    return f"{PREFIX}:progress:{request_id}"


def idempotency(scope: str, key_digest: str) -> str:
    """Hash of one idempotency key's call: the request's hash, the call that owns it and, once it
    finished, its result. `scope` is the API key's digest (or "anonymous" without auth), so keys of
    different callers never meet; `key_digest` is the SHA-256 of the caller's Idempotency-Key.
    Lives for GATEWAY_IDEMPOTENCY_WINDOW_SECONDS, so a retry within it gets the first call's answer."""
    return f"{PREFIX}:idempotency:{scope}:{key_digest}"


def completion_log(request_id: str) -> str:
    """Stream of one completion, from which a dropped stream resumes and a retry attaches.

    Its first entry is the call's record (gateway/completion_log.py), added by the submit script
    with the job; then every event of the job, added by the workers' publish script in the same
    step as the reply-stream entry (so it holds exactly what a caller can have been sent); and,
    where the call ended without its job's terminal event (a deadline, a lost job), an entry
    that says how. It lives until the job's deadline plus GATEWAY_RESUME_WINDOW_SECONDS, and
    for that window once the call has ended.
    """
    return f"{PREFIX}:completion:{request_id}"


def watched(request_id: str) -> str:
    """Set, with a short TTL refreshed while it lasts, by every call reading a completion's log.

    A stream whose caller dropped keeps its job running while this lease is held or for
    GATEWAY_RESUME_GRACE_SECONDS after the drop, so that a resume finds the rest of it.
    """
    return f"{PREFIX}:watched:{request_id}"
