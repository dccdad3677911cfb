"""Registers ChatService with request decoding that cannot fail inside gRPC.

The generated registration lets a request that is not valid protobuf fail in gRPC's
own deserializer, which answers UNKNOWN. Here such bytes become an Undecodable value
that the servicer refuses with INVALID_ARGUMENT, like any other bad request.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from chat.v1 import chat_pb2

SERVICE = "chat.v1.ChatService"


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that do not parse as the RPC's request message."""

    message_type: str
    error: str


def _lenient(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(exc))

    return decode


def add_chat_service(servicer: Any, server: grpc.aio.Server) -> None:
    request = _lenient(chat_pb2.ChatCompletionRequest)
    handlers = {
        "ChatCompletion": grpc.unary_unary_rpc_method_handler(
            servicer.ChatCompletion,
            request_deserializer=request,
            response_serializer=chat_pb2.ChatCompletionResponse.SerializeToString,
        ),
        "StreamChatCompletion": grpc.unary_stream_rpc_method_handler(
            servicer.StreamChatCompletion,
            request_deserializer=request,
            response_serializer=chat_pb2.ChatCompletionChunk.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            # ListModels takes no input: whatever arrives is ignored.
            request_deserializer=_lenient(chat_pb2.ListModelsRequest),
            response_serializer=chat_pb2.ListModelsResponse.SerializeToString,
        ),
        "ResumeChatCompletion": grpc.unary_stream_rpc_method_handler(
            servicer.ResumeChatCompletion,
            request_deserializer=_lenient(chat_pb2.ResumeChatCompletionRequest),
            response_serializer=chat_pb2.ChatCompletionChunk.SerializeToString,
        ),
        "GetChatCompletion": grpc.unary_unary_rpc_method_handler(
            servicer.GetChatCompletion,
            request_deserializer=_lenient(chat_pb2.GetChatCompletionRequest),
            response_serializer=chat_pb2.ChatCompletionResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
