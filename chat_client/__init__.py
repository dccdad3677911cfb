"""Python client for chat.v1.ChatService, shaped like the reference chat-completions SDK.

    from chat_client import Client

    client = Client()  # CHAT_SERVICE_ADDRESS or localhost:50051
    completion = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Hello"}],
    )
    print(completion.choices[0].message.content)

`AsyncClient` has the same surface with `await` and `async for`.
"""

from chat_client.client import TLS, AsyncClient, Client
from chat_client.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)
from chat_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    Message,
    Model,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "TLS",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Choice",
    "ChoiceLogprobs",
    "ChunkChoice",
    "Client",
    "Delta",
    "InternalServerError",
    "Message",
    "Model",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]
