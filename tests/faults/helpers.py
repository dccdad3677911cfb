"""Helpers for fault tests: find the worker that runs a job, time streams."""

import time
from subprocess import Popen

import grpc
import redis

from chat.v1 import chat_pb2, chat_pb2_grpc
from common import keys
from tests.integration.stack import Stack, job_streams_of, pending_jobs


def started(stack: Stack, workers: int, **worker_env: str) -> chat_pb2_grpc.ChatServiceStub:
    """Starts the gateway and `workers` workers, waits until they serve, returns a stub."""
    stack.start_gateway()
    for _ in range(workers):
        stack.start_worker(**worker_env)
    stack.wait_worker_ready()
    return chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(stack.address))


def owner_of_only_job(stack: Stack, client: redis.Redis) -> Popen[bytes]:
    """The worker process holding the one pending job (consumer names are worker-N)."""
    [entry] = pending_jobs(client)
    return stack.workers[int(entry["consumer"].decode().split("-")[1])]


def only_job_request_id(client: redis.Redis) -> str:
    """The request id of the one job queued or running, on whichever of the model's streams."""
    [(_id, fields)] = [
        entry for stream in job_streams_of(client) for entry in client.xrange(stream, "-", "+")
    ]
    return str(fields[keys.REQUEST_ID_FIELD].decode())


class TimedStream:
    """Reads a stream, recording the text and the longest gap between chunks."""

    def __init__(self, stub: chat_pb2_grpc.ChatServiceStub, request: chat_pb2.ChatCompletionRequest) -> None:
        self.call = stub.StreamChatCompletion(request, timeout=60)
        self.text = ""
        self.chunks: list[chat_pb2.ChatCompletionChunk] = []
        self.longest_gap = 0.0
        self._last = time.monotonic()

    def read(self, content_chunks: int | None = None) -> None:
        """Reads that many content chunks, or to the end."""
        seen = 0
        for chunk in self.call:
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - self._last)
            self._last = now
            self.chunks.append(chunk)
            self.text += chunk.choices[0].delta.content
            seen += bool(chunk.choices[0].delta.content)
            if content_chunks is not None and seen >= content_chunks:
                return


def status_of(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code()  # type: ignore[no-any-return]
