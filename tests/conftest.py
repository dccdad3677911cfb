"""Fixtures shared by all tests."""

from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401 - see below
import pytest

from devstack.redis_server import RedisServer

# hypothesis is imported up front, not lazily by its plugin at the end of the session: redis-py
# leaves the socket of a command that timed out or was cancelled to the garbage collector, and a
# ResourceWarning raised by a collection in the middle of an assertion-rewriting import trips
# CPython 3.11's "SystemError: AST constructor recursion depth mismatch".


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free port, for the whole session."""
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()
