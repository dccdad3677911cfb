"""Typed view of Redis stream replies (redis-py returns them untyped)."""

from collections.abc import Iterator
from typing import Any

Entry = tuple[bytes, dict[bytes, bytes]]


def entries(reply: Any) -> Iterator[Entry]:
    """The (entry id, fields) pairs of an XREAD or XREADGROUP reply, across all its streams."""
    for _stream, stream_entries in reply or []:
        yield from stream_entries


def entries_by_stream(reply: Any) -> Iterator[tuple[str, Entry]]:
    """The (stream name, (entry id, fields)) pairs of an XREAD or XREADGROUP reply."""
    for stream, stream_entries in reply or []:
        name = stream.decode() if isinstance(stream, bytes) else str(stream)
        for entry in stream_entries:
            yield name, entry
