"""An OpenAI-compatible HTTP server over the KV-cache sampler.

    cacherl serve --checkpoint DIR [--tokenizer qwen3|DIR] --port 8000

Endpoints: `POST /v1/chat/completions` (messages, tools, temperature, top_p, top_k, max_tokens,
stop, seed, n, logprobs, `chat_template_kwargs.enable_thinking`), `GET /v1/models`, `GET /health`.
Responses carry `tool_calls` (arguments as a JSON string) and `reasoning_content`, as vLLM and
other OpenAI-compatible servers return them. Streaming is not supported (a 400 says so).

Requests that arrive together are generated together (`cacherl_jax.sampling.batching`): one
worker thread takes every request waiting (up to `max_batch` rows), waits `batch_window_s` for
more, and runs them as one batch with per-row sampling settings. Every row's randomness depends
only on its own seed and positions, so batching never changes what a request gets.

Errors are JSON bodies `{"error": {"message", "type", "param", "code"}}`: 400 for malformed
requests and for prompts that do not fit in the context, 404 for unknown paths or models.

Only the standard library is used for HTTP (`http.server.ThreadingHTTPServer`); JAX and the model
load when a server is built, not when this module is imported (it also defines the CLI command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cacherl_jax.chat.tokenizer import Tokenizer
    from cacherl_jax.sampling import Generation, Sampler, SamplingParams
    from cacherl_jax.sampling.batching import BatchingEngine

DEFAULT_MAX_TOKENS = 1024
_ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_BODY_BYTES = 32 * 2**20


class RequestError(Exception):
    """A request the server refuses; becomes an HTTP error with an OpenAI-style JSON body."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = HTTPStatus.BAD_REQUEST,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = (
            message,
            param,
            int(status),
            kind,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


# --- request parsing ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completion request, rendered to prompt tokens."""

    prompt_ids: list[int]
    sampling: list[SamplingParams]  # one per choice (n)
    stop_strings: tuple[str, ...]
    logprobs: bool


def _text_content(content: Any, where: str) -> str | None:
    """A message's content as text: a string, or a list of `{"type": "text"}` parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                raise RequestError(
                    f"{where}.content[{i}]: only text parts are supported", param="messages"
                )
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.content[{i}].text must be a string", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(
        f"{where}.content must be a string or a list of text parts", param="messages"
    )


def _convert_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages -> the dicts the chat template renders (checked field by field)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{where} must be an object", param="messages")
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(
                f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}", param="messages"
            )
        converted: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": _text_content(message.get("content"), where) or "",
        }
        if role == "assistant":
            reasoning = message.get("reasoning_content", message.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise RequestError(
                        f"{where}.reasoning_content must be a string", param="messages"
                    )
                converted["reasoning_content"] = reasoning
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be a list", param="messages")
            converted_calls = []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, Mapping) else None
                if not (isinstance(function, Mapping) and isinstance(function.get("name"), str)):
                    raise RequestError(
                        f"{where}.tool_calls[{j}] needs function.name", param="messages"
                    )
                arguments = function.get("arguments", {})
                if not isinstance(arguments, str | Mapping):
                    raise RequestError(
                        f"{where}.tool_calls[{j}].function.arguments must be a JSON string",
                        param="messages",
                    )
                # A string is rendered verbatim: the text the model generated comes back unchanged.
                converted_calls.append(
                    {
                        "type": "function",
                        "function": {"name": function["name"], "arguments": arguments},
                    }
                )
            if converted_calls:
                converted["tool_calls"] = converted_calls
        out.append(converted)
    return out


def _check_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not (
            isinstance(tool, Mapping)
            and tool.get("type", "function") == "function"
            and isinstance(function, Mapping)
            and isinstance(function.get("name"), str)
        ):
            raise RequestError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                param="tools",
            )
    return list(tools) or None


def _number(body: Mapping[str, Any], name: str, default: Any, kind: type, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind is int and not isinstance(value, int))
    ):
        raise RequestError(
            f"'{name}' must be {'an integer' if kind is int else 'a number'}", param=name
        )
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"'{name}' must be in [{low}, {high}], got {value}", param=name)
    return kind(value)


def parse_chat_request(
    body: Any,
    tokenizer: Tokenizer,
    *,
    context_len: int,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> ChatRequest:
    """Validates an OpenAI chat-completion body and renders its prompt; raises RequestError."""
    from cacherl_jax.chat.template import render_prompt
    from cacherl_jax.sampling import SamplingParams

    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    if body.get("stream"):
        raise RequestError("stream=true is not supported by this server", param="stream")
    messages = _convert_messages(body.get("messages"))
    tools = _check_tools(body.get("tools"))
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise RequestError("only tool_choice 'auto' and 'none' are supported", param="tool_choice")
    if body.get("tool_choice") == "none":
        tools = None
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise RequestError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    enable_thinking = kwargs.get("enable_thinking")
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise RequestError("enable_thinking must be true or false", param="chat_template_kwargs")

    temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("'top_p' must be > 0", param="top_p")
    top_k = _number(body, "top_k", 0, int, -1)
    n = _number(body, "n", 1, int, 1, 64)
    seed = _number(body, "seed", None, int)
    max_tokens = _number(body, "max_completion_tokens", None, int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, int, 1)
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError("'logprobs' must be a boolean", param="logprobs")
    if body.get("top_logprobs"):
        raise RequestError("top_logprobs is not supported", param="top_logprobs")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not (isinstance(stop, list | tuple) and all(isinstance(s, str) and s for s in stop)):
        raise RequestError("'stop' must be a string or a list of non-empty strings", param="stop")

    try:
        prompt_ids = render_prompt(
            messages, tools, tokenizer, enable_thinking=enable_thinking
        ).token_ids.tolist()
    except (KeyError, TypeError, ValueError) as err:
        raise RequestError(f"cannot render these messages: {err}", param="messages") from err
    room = context_len - len(prompt_ids)
    if room < 1:
        raise RequestError(
            f"the prompt is {len(prompt_ids)} tokens; this model's context is {context_len} tokens "
            "(prompt and completion together)",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > room:
        raise RequestError(
            f"max_tokens={max_tokens} plus the {len(prompt_ids)}-token prompt exceeds the "
            f"{context_len}-token context",
            param="max_tokens",
            code="context_length_exceeded",
        )
    special = tokenizer.special
    stops = (special.im_end, special.endoftext)
    base_seed = seed if seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
    sampling = [
        SamplingParams(
            temperature=temperature,
            top_k=max(top_k, 0),
            top_p=top_p,
            max_new_tokens=min(max_tokens or default_max_tokens, room),
            stop_token_ids=stops,
            seed=base_seed + i,
        )
        for i in range(n)
    ]
    return ChatRequest(prompt_ids, sampling, tuple(stop), logprobs)


# --- response building ----------------------------------------------------------------------------


def completion_choice(
    index: int,
    generation: Generation,
    tokenizer: Tokenizer,
    *,
    stop_strings: Sequence[str] = (),
    logprobs: bool = False,
) -> dict[str, Any]:
    """One OpenAI `choices[]` entry from generated token ids: reasoning, content and tool calls
    split by the Qwen3 parser; `finish_reason` is `tool_calls` when calls were made."""
    from cacherl_jax.chat.parse import parse_assistant

    ids = [int(t) for t in generation.token_ids]
    special = tokenizer.special
    finish = "stop" if generation.stop_reason == "stop" else "length"
    if ids and ids[-1] in (special.im_end, special.endoftext):
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    if cut >= 0:
        text, finish = text[:cut], "stop"
    parsed = parse_assistant(text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning:
        message["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        message["tool_calls"] = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": json.dumps(call.arguments, ensure_ascii=False),
                },
            }
            for call in parsed.tool_calls
        ]
        message["content"] = parsed.content or None
        if finish == "stop":
            finish = "tool_calls"
    choice: dict[str, Any] = {
        "index": index,
        "message": message,
        "finish_reason": finish,
        "logprobs": None,
    }
    if logprobs:
        choice["logprobs"] = {
            "content": [
                {
                    "token": tokenizer.decode([t]),
                    "logprob": float(lp),
                    "bytes": list(tokenizer.decode([t]).encode()),
                    "top_logprobs": [],
                }
                for t, lp in zip(generation.token_ids, generation.logprobs, strict=True)
            ]
        }
    return choice


def chat_completion(
    request: ChatRequest, generations: Sequence[Generation], tokenizer: Tokenizer, model: str
) -> dict[str, Any]:
    choices = [
        completion_choice(
            i, g, tokenizer, stop_strings=request.stop_strings, logprobs=request.logprobs
        )
        for i, g in enumerate(generations)
    ]
    completion_tokens = sum(len(g) for g in generations)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": len(request.prompt_ids),
            "completion_tokens": completion_tokens,
            "total_tokens": len(request.prompt_ids) + completion_tokens,
        },
    }


# --- HTTP --------------------------------------------------------------------------------------------


class ChatServer(ThreadingHTTPServer):
    """The HTTP server; `engine`, `tokenizer` and `model_name` serve every request."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        engine: BatchingEngine,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        context_len: int,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ):
        super().__init__(address, _Handler)
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_len = context_len
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def chat(self, body: Any) -> dict[str, Any]:
        if isinstance(body, Mapping) and body.get("model") not in (None, self.model_name):
            raise RequestError(
                f"model {body.get('model')!r} is not served here; GET /v1/models lists "
                f"{self.model_name!r}",
                param="model",
                status=HTTPStatus.NOT_FOUND,
                code="model_not_found",
            )
        request = parse_chat_request(
            body,
            self.tokenizer,
            context_len=self.context_len,
            default_max_tokens=self.default_max_tokens,
        )
        generations = self.engine.submit(request.prompt_ids, request.sampling)
        return chat_completion(request, generations, self.tokenizer, self.model_name)

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "cacherl",
                    "max_model_len": self.context_len,
                }
            ],
        }

    def shutdown_all(self) -> None:
        self.shutdown()
        self.server_close()
        self.engine.close()


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send(HTTPStatus.OK, {"status": "ok"})
        elif path == "/v1/models":
            self._send(HTTPStatus.OK, self.server.models())
        else:
            self._error(RequestError(f"no route GET {path}", status=HTTPStatus.NOT_FOUND))

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        try:
            body = self._read_json()
            if path != "/v1/chat/completions":
                raise RequestError(f"no route POST {path}", status=HTTPStatus.NOT_FOUND)
            self._send(HTTPStatus.OK, self.server.chat(body))
        except RequestError as err:
            self._error(err)
        except Exception as err:  # a bug, not the client's fault: say so instead of hanging up
            self._error(
                RequestError(
                    f"internal error: {type(err).__name__}: {err}",
                    status=HTTPStatus.INTERNAL_SERVER_ERROR,
                    kind="server_error",
                )
            )

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a Content-Length header is required")
        if int(length) > _MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            raise RequestError(f"request body over {_MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(f"the request body is not valid JSON: {err}") from err

    def _send(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        self._send(err.status, err.body())

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the logs of a batch job


def make_server(
    sampler: Sampler,
    tokenizer: Tokenizer,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "cacherl",
    context_len: int | None = None,
    max_batch: int = 32,
    batch_window_s: float = 0.01,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> ChatServer:
    """A server bound to (host, port) (port 0: any free port); run `serve_forever()` on it."""
    from cacherl_jax.sampling.batching import BatchingEngine  # JAX loads with the server

    context_len = context_len or sampler.config.max_position_embeddings
    engine = BatchingEngine(sampler, max_batch=max_batch, batch_window_s=batch_window_s)
    return ChatServer(
        (host, port),
        engine,
        tokenizer,
        model_name=model_name,
        context_len=context_len,
        default_max_tokens=default_max_tokens,
    )


# --- command line -------------------------------------------------------------------------------------


def _load(checkpoint: str, tokenizer_spec: str | None):
    """(config, params, tokenizer) from an HF directory or our orbax checkpoint."""
    from pathlib import Path

    from cacherl_jax.chat.tokenizer import TokenizerError, load_tokenizer
    from cacherl_jax.model import hf_checkpoint, native_checkpoint

    if native_checkpoint.is_native_checkpoint(checkpoint):
        config, params = native_checkpoint.load_params(checkpoint)
    else:
        config, params = hf_checkpoint.load_hf_checkpoint(checkpoint)
    if tokenizer_spec is None:
        if not (Path(checkpoint) / "tokenizer.json").exists():
            raise TokenizerError(
                f"{checkpoint} has no tokenizer.json: pass --tokenizer qwen3 or a tokenizer directory"
            )
        tokenizer_spec = checkpoint
    tokenizer = load_tokenizer(tokenizer_spec)
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens, the model only "
            f"{config.vocab_size}"
        )
    return config, params, tokenizer


def _serve_command(args: argparse.Namespace) -> None:
    from pathlib import Path

    from cacherl_jax.sampling import Sampler

    config, params, tokenizer = _load(args.checkpoint, args.tokenizer)
    sampler = Sampler(params, config)
    server = make_server(
        sampler,
        tokenizer,
        host=args.host,
        port=args.port,
        model_name=args.model_name or Path(args.checkpoint).name,
        context_len=args.context_len or min(config.max_position_embeddings, 4096),
        max_batch=args.max_batch,
        batch_window_s=args.batch_window_ms / 1000,
        default_max_tokens=args.default_max_tokens,
    )
    print(f"serving {server.model_name} at {server.url}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.engine.close()


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `cacherl serve` to the CLI's subcommands (imports nothing heavy)."""
    serve = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible chat server (/v1/chat/completions with tools)",
        description="Serve a Qwen3 checkpoint (Hugging Face directory or cacherl_jax orbax "
        "checkpoint) over an OpenAI-compatible HTTP API: /v1/chat/completions (tools, "
        "reasoning_content), /v1/models, /health. Concurrent requests are batched.",
    )
    serve.add_argument("--checkpoint", required=True, metavar="DIR")
    serve.add_argument(
        "--tokenizer",
        default=None,
        help="'qwen3' or a tokenizer directory (default: the checkpoint's tokenizer.json)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-name", default=None, help="the model id (default: directory name)")
    serve.add_argument(
        "--context-len",
        type=int,
        default=None,
        help="prompt + completion tokens per request (default: min(model maximum, 4096))",
    )
    serve.add_argument("--max-batch", type=int, default=32, help="rows generated together")
    serve.add_argument("--batch-window-ms", type=float, default=10.0)
    serve.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    serve.set_defaults(run=_serve_command)
    return serve
