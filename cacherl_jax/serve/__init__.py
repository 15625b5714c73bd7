"""An OpenAI-compatible HTTP server over the sampler (`cacherl serve`)."""

from cacherl_jax.serve.server import (
    ChatRequest,
    ChatServer,
    RequestError,
    chat_completion,
    completion_choice,
    make_server,
    parse_chat_request,
    register_cli,
)

__all__ = [
    "ChatRequest",
    "ChatServer",
    "RequestError",
    "chat_completion",
    "completion_choice",
    "make_server",
    "parse_chat_request",
    "register_cli",
]
