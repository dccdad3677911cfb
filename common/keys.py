"""Every Redis key and consumer-group name the service uses, in one place.

Keys that one script or transaction touches together carry the same hash tag (the part in
braces), so that Redis Cluster keeps them in one slot; on a single Redis tags mean nothing.
There are three kinds of slot:

- a job queue's, `{model#shard}`: the job stream with what is written with its entries (the
  submitted marker, the cancel flag, dead letters). One model's jobs may spread over several
  streams (`job_stream(model, shard)`), so a hot model does not sit on one shard.
- a gateway's, `{tag}` with tag = gateway_tag(gateway_id): its reply stream and, for every job
  it queued, the job's progress record, completion log and watch lease. A job's events update
  all of them in one atomic step (worker/publisher.py), which is why they share the gateway's
  slot; a request id starts with its gateway's tag, so any process finds the keys of a job from
  its id alone (a resume on another gateway, for one). Per-token traffic thus spreads over
  shards with the gateways.
- an API key's, `{digest}`: its rate-limit windows and the markers of their updates.

Keys read or written alone (API key records, engines, idempotency records) need no tag.
"""

import hashlib
import secrets

PREFIX = "chat"

# Hex digits at the front of a request id that are its gateway's tag (common to its job's keys).
TAG_CHARS = 4


def gateway_tag(gateway_id: str) -> str:
    """The hash tag of a gateway's slot: a digest of its id, so each process finds it alone."""
    return hashlib.sha256(gateway_id.encode()).hexdigest()[:TAG_CHARS]


def new_request_id(gateway_id: str) -> str:
    """A new job's id: 32 hex digits, the first TAG_CHARS its gateway's tag, the rest random."""
    return gateway_tag(gateway_id) + secrets.token_hex(16 - TAG_CHARS // 2)


def _request_slot(request_id: str) -> str:
    return "{" + request_id[:TAG_CHARS] + "}"


def slot_of(key: str) -> str:
    """The hash tag of a key made here, braces included: what a key kept with it must carry."""
    start = key.index("{")
    return key[start : key.index("}", start) + 1]


# Consumer group on every job stream; all workers of a model share it.
WORKER_GROUP = "workers"

# Fields of a job-stream or reply-stream entry. The payload is the protobuf message;
# request id and reply stream are repeated in plain text so that an entry whose payload
# cannot be decoded can still be answered (job entries) or attributed (event entries).
PAYLOAD_FIELD = b"p"
REQUEST_ID_FIELD = b"r"
REPLY_TO_FIELD = b"g"


def job_stream(model: str, shard: int = 0) -> str:
    """One of a model's streams of queued jobs (consumer group WORKER_GROUP), in its own slot."""
    return f"{PREFIX}:jobs:{{{model}#{shard}}}"


def flex_stream(model: str, shard: int = 0) -> str:
    """The flex tier's lane of a model's shard (consumer group WORKER_GROUP): jobs of
    service_tier "flex", which workers take only with the room the shard's stream and their own
    leave (worker/jobs.py). In the shard's slot, so the job's marker, cancel flag and dead letters
    are the shard's keys."""
    return f"{job_stream(model, shard)}:flex"


def is_flex_stream(job_stream: str) -> bool:
    """Whether a job stream is a flex lane (flex_stream)."""
    return job_stream.endswith("}:flex")


def worker_stream(model: str, shard: int, worker_id: str) -> str:
    """The job stream of one worker (consumer group WORKER_GROUP): jobs placed on it because the
    worker holds their prompt's prefix in its cache (gateway/placement.py). In the slot of the
    model's shard `shard`, so that the worker blocks on both in one read, and the job's marker,
    cancel flag and dead letters are the same keys whichever of the two streams holds it."""
    return f"{job_stream(model, shard)}:w:{worker_id}"


def is_worker_stream(job_stream: str) -> bool:
    """Whether a job stream is a worker's own (worker_stream), not one of a model's shards."""
    return ":w:" in job_stream[job_stream.find("}") :]


def shard_of(job_stream: str) -> int:
    """The shard in whose slot a job stream lives, a model's (job_stream) or a worker's (worker_stream)."""
    return int(slot_of(job_stream)[1:-1].rpartition("#")[2])


def worker_streams(model: str, shard: int) -> str:
    """Set of the worker streams in shard `shard`'s slot: where other workers look for the jobs
    of a worker that died, and a gateway checks that a stream it places on still exists."""
    return f"{PREFIX}:workerstreams:{{{model}#{shard}}}"


def prefix_index(model: str, tag: str, digest: str) -> str:
    """The worker that last ran a prompt whose leading tokens (or affinity key) hash to `digest`
    (gateway/placement.py). `tag` is the digest of the prompt's first block: one conversation's
    keys share a slot, so one MGET reads them, and conversations spread over the shards."""
    return f"{PREFIX}:prefix:{{{model}:{tag}}}:{digest}"


def conversations(model: str, worker_id: str) -> str:
    """Sorted set of the conversations a worker last ran (each the digest of its prompt's first
    block, scored by when), whose count is the worker's share of the cached conversations
    (gateway/placement.py: a new conversation goes to the worker with the fewest). In the model's
    slot, so one pipeline reads the counts of all of a model's workers."""
    return f"{PREFIX}:conversations:{{{model}}}:{worker_id}"


def dead_letter_stream(job_stream: str) -> str:
    """Jobs of one job stream given up on (undecodable, or delivered too many times), for people
    to inspect; in the job stream's slot, since the step that ends a job writes it."""
    return f"{PREFIX}:dead:{slot_of(job_stream)}"


def reply_stream(gateway_id: str) -> str:
    """Stream of events for every job of one gateway process; only that gateway reads it."""
    return f"{PREFIX}:replies:{{{gateway_tag(gateway_id)}}}:{gateway_id}"


def cancel_flag(job_stream: str, request_id: str) -> str:
    """Set (with a TTL) when the caller of a job has gone; workers abort or skip the job. In the
    job stream's slot: it is set only while the job's entry is there, and deleted with it."""
    return f"{PREFIX}:cancel:{slot_of(job_stream)}:{request_id}"


# How long a retry marker lives: far longer than a command's timeout plus its one retry.
RETRY_MARKER_TTL_SECONDS = 60


def submitted(job_stream: str, request_id: str) -> str:
    """The entry id of a queued job, set by the submit script in the same step as its XADD (so in
    the job stream's slot).

    A submit that is retried after Redis ran it (the reply timed out) finds the marker and
    returns the same entry instead of queueing the job twice. Workers delete it with the job.
    """
    return f"{PREFIX}:submitted:{slot_of(job_stream)}:{request_id}"


def applied(window: str, token: str) -> str:
    """Marks one update of a rate-limit window (admit or refund) as applied, so its retry is not
    applied twice; in the window's slot, since the update's script writes both."""
    return f"{PREFIX}:applied:{slot_of(window)}:{token}"


def api_key(digest: str) -> str:
    """Hash of one API key's record (name, models, limits, revoked); `digest` is the key's SHA-256."""
    return f"{PREFIX}:apikey:{digest}"


# Hash of key name -> digest, to list and revoke keys by name.
API_KEY_NAMES = f"{PREFIX}:apikeys"


def rate_window(digest: str, minute: int) -> str:
    """Requests and tokens one API key used in one minute (expires after two)."""
    return f"{PREFIX}:ratelimit:{{{digest}}}:{minute}"


def engines(model: str) -> str:
    """Hash of worker id -> the engine it runs for the model (context window), refreshed while alive."""
    return f"{PREFIX}:engines:{model}"


def progress(request_id: str) -> str:
    """A running job's progress record (common/codec.py Progress): the tokens generated and the
    text and events published so far, written in the same step as its events, so a worker that
    takes the job over continues where the events stopped. Deleted with the job."""
    return f"{PREFIX}:progress:{_request_slot(request_id)}:{request_id}"


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
    return f"{PREFIX}:completion:{_request_slot(request_id)}:{request_id}"


def watched(request_id: str) -> str:
    """Set, with a short TTL refreshed while it lasts, by every call reading a completion's log.

    A stream whose caller dropped keeps its job running while this lease is held or for
    GATEWAY_RESUME_GRACE_SECONDS after the drop, so that a resume finds the rest of it.
    """
    return f"{PREFIX}:watched:{_request_slot(request_id)}:{request_id}"
