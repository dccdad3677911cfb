"""Baseline (b): a bare grpc.aio streaming server in front of the benchmark engine, no Redis.

What the full stack is compared with: the same engine and the same API, minus validation,
queue, worker and relay. Started by bench/relay.py as its own process:

    .venv/bin/python -m bench.bare_server PORT TOKENS_PER_SECOND
"""

import itertools
import sys
from collections.abc import AsyncIterator

import grpc
import uvloop

from chat.v1 import chat_pb2, chat_pb2_grpc
from common.models import ModelSpec
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.bench import BenchEngine


class BareServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, engine: BenchEngine) -> None:
        self._engine = engine
        self._ids = itertools.count()

    async def StreamChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        params = SamplingParams(temperature=0, max_tokens=request.max_tokens or 16)
        yield chat_pb2.ChatCompletionChunk(
            choices=[chat_pb2.ChunkChoice(delta=chat_pb2.Delta(role="assistant"))]
        )
        async for delta in self._engine.generate(GenerationRequest(f"b{next(self._ids)}", [1], params)):
            choice = chat_pb2.ChunkChoice(
                delta=chat_pb2.Delta(content=delta.text), finish_reason=delta.finish_reason or ""
            )
            yield chat_pb2.ChatCompletionChunk(choices=[choice])


async def serve(port: int, tokens_per_second: float) -> None:
    server = grpc.aio.server()
    engine = BenchEngine(
        ModelSpec("SmolLM2-135M-Instruct", __import__("pathlib").Path(".")), tokens_per_second
    )
    chat_pb2_grpc.add_ChatServiceServicer_to_server(BareServicer(engine), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), float(sys.argv[2])))
