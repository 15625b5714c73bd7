"""A scripted OpenAI-compatible endpoint on 127.0.0.1, for testing our HTTP clients for real.

`reply(request_json) -> str | None` decides each chat completion's content; it may sleep (to
trigger client timeouts), return None to answer HTTP 500, or return bytes to send them as a
200 body verbatim (malformed responses). `usage` sets the token counts every reply reports.
Every request body is recorded.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OpenAIStub:
    def __init__(
        self,
        reply: Callable[[dict], str | bytes | None],
        *,
        usage: tuple[int, int] = (1, 1),
    ):
        self.reply = reply
        prompt_tokens, completion_tokens = usage
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                content = stub.reply(body)
                if content is None:
                    self._send(500, {"error": {"message": "scripted failure", "type": "server"}})
                    return
                if isinstance(content, bytes):
                    self._send_raw(200, content)
                    return
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(stub.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", "stub"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                        },
                    },
                )

            def _send(self, status: int, payload: dict):
                self._send_raw(status, json.dumps(payload).encode())

            def _send_raw(self, status: int, data: bytes):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OpenAIStub:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
