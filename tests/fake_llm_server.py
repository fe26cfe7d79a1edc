"""A local fake of the Gemini and OpenAI HTTP APIs for tests (stdlib http.server in a thread, 127.0.0.1, ephemeral port).

The real google-genai / openai SDK clients are pointed at it via their base-URL options:

* Gemini: ``POST /{v1,v1beta}/models/{model}:generateContent`` -> ``{"candidates": [...]}``
  (client: ``genai.Client(http_options=HttpOptions(base_url=server.url))``)
* OpenAI: ``POST /v1/chat/completions`` -> a ``chat.completion`` object
  (client: ``OpenAI(base_url=server.url + "/v1")``)

Each endpoint is driven by a handler ``f(request) -> Reply`` (request = dict with ``path``, ``headers``, ``body``);
:class:`Script` replays a fixed sequence of replies. Every request is recorded in ``server.requests``.
"""
from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON; str/bytes sent raw
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0


# ------------------------------------------------------------------------------------------------- Gemini replies
def gemini_text(text: str, finish: str = "STOP") -> Reply:
    return Reply(200, {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish, "index": 0}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 10, "totalTokenCount": 20},
        "modelVersion": "gemini-2.5-flash",
    })


def gemini_verdict(preferred: str, a_score: int = 70, b_score: int = 60, reasons: str = "fake") -> Reply:
    return gemini_text(json.dumps({"preferred": preferred, "a_score": a_score, "b_score": b_score, "reasons": reasons}))


def gemini_error(status: int, message: str = "fake error", retry_after: str | None = None) -> Reply:
    names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
             429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
    headers = {"Retry-After": retry_after} if retry_after else {}
    return Reply(status, {"error": {"code": status, "message": message, "status": names.get(status, "UNKNOWN")}}, headers)


def gemini_images(request: dict) -> list[bytes]:
    """The inline image bytes of a generateContent request, in order."""
    out = []
    for c in request["body"].get("contents", []):
        for p in c.get("parts", []):
            d = p.get("inlineData") or p.get("inline_data")
            if d:
                # the SDK sends URL-safe base64 (proto-JSON bytes accept both alphabets)
                out.append(base64.urlsafe_b64decode(d["data"].replace("+", "-").replace("/", "_")))
    return out


def gemini_texts(request: dict) -> list[str]:
    return [p["text"] for c in request["body"].get("contents", []) for p in c.get("parts", []) if "text" in p]


# ------------------------------------------------------------------------------------------------- OpenAI replies
def openai_message(content: str | None, refusal: str | None = None, finish: str = "stop", model: str = "gpt-4o") -> Reply:
    return Reply(200, {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                     "message": {"role": "assistant", "content": content, "refusal": refusal}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
    })


def openai_prompts(prompts: list[str]) -> Reply:
    return openai_message(json.dumps({"prompts": prompts}))


def openai_error(status: int, message: str = "fake error") -> Reply:
    return Reply(status, {"error": {"message": message, "type": "fake", "param": None, "code": None}},
                 {"x-should-retry": "false"})


# --------------------------------------------------------------------------------------------------------- server
class Script:
    """Replies in sequence; after the list is exhausted, ``default`` (a Reply or a handler) answers."""

    def __init__(self, replies: list[Reply], default: Reply | Callable[[dict], Reply] | None = None):
        self._replies = list(replies)
        self._default = default
        self._lock = threading.Lock()

    def __call__(self, request: dict) -> Reply:
        with self._lock:
            if self._replies:
                return self._replies.pop(0)
        if callable(self._default):
            return self._default(request)
        return self._default or Reply(500, {"error": {"code": 500, "message": "script exhausted"}})


class FakeLLMServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.gemini: Callable[[dict], Reply] = lambda req: gemini_verdict("A")
        self.openai: Callable[[dict], Reply] = lambda req: openai_error(500, "no handler")
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                req = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                with server._lock:
                    server.requests.append(req)
                path = self.path.split("?")[0]
                if ":generateContent" in path and (path.startswith("/v1beta/models/") or path.startswith("/v1/models/")):
                    reply = server.gemini(req)
                elif path == "/v1/chat/completions":
                    reply = server.openai(req)
                else:
                    reply = Reply(404, {"error": {"code": 404, "message": f"unknown path {path}"}})
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                b = reply.body
                data = b if isinstance(b, bytes) else (b.encode() if isinstance(b, str) else json.dumps(b).encode())
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # client timed out and went away
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_port}"

    def count(self, kind: str) -> int:
        key = ":generateContent" if kind == "gemini" else "/chat/completions"
        return sum(key in r["path"] for r in self.requests)

    def __enter__(self) -> "FakeLLMServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
