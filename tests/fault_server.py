"""A local HTTP server on 127.0.0.1 serving generated JPEGs with injected faults (download tests and benchmark).

Paths (``<name>`` is any word; the same name always gives the same image):

==========================  =================================================================================
``/img/<name>.jpg``         a JPEG (``image/jpeg``), 200
``/404/<name>``             404
``/429/<name>``             429 with ``Retry-After: 1`` on the first request of that path, then the JPEG
``/flaky/<name>``           500 on the first request of that path, then the JPEG
``/slow/<name>``            headers, then the body only after ``slow_s`` seconds (a read timeout)
``/truncated/<name>``       Content-Length larger than the body, connection closed early (every time)
``/wrongtype/<name>``       the JPEG's bytes as ``text/plain``
``/html/<name>``            an HTML page (``text/html``)
``/disguised/<name>``       an HTML page declared ``image/jpeg`` (caught by the magic bytes)
``/loop/<name>``            302 to ``/loop2/<name>``, which redirects back (a loop)
``/redirect/<name>``        302 to ``/img/<name>.jpg``
``/tofile/<name>``          302 to ``file:///etc/passwd``
``/big/<name>``             ``big_bytes`` of JPEG-prefixed data with its Content-Length
``/bigstream/<name>``       the same, chunked (no Content-Length: the client must count)
``/gzipbomb/<name>``        a small gzip body (declared Content-Encoding) that inflates to ``big_bytes``
``/blob/<size>/<name>``     ``size`` bytes that start like a JPEG (benchmark bodies; cached per size)
==========================  =================================================================================

Every request waits ``latency_s`` first (the benchmark's injected latency) and is logged (``requests``: paths in
arrival order; ``count(path)``). ``hold("/img/", after=4)`` makes every later request under that prefix wait until
``release()`` (``held`` counts the waiting ones), then closes it: a test can kill a client while it is surely
mid-download. A held request gets its status line at once and then one header byte every 0.2 s, so no read timeout
ends it, whatever the load: the client stays stuck until it is killed. Run in a thread (:class:`FaultServer`) or as a
process:
``python tests/fault_server.py --latency 0.05`` prints ``port <n>`` and serves until killed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

JPEG_PREFIX = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"


def jpeg_bytes(name: str, width: int = 560, height: int = 420) -> bytes:
    """A deterministic textured JPEG (passes the flatness and entropy filters) for ``name``."""
    import cv2

    rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    base = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    image = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image.astype(np.int16) + rng.integers(-40, 40, image.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return buf.tobytes()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None,
              length: int | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        state = self.server.state
        path = self.path
        with state["lock"]:
            state["requests"].append(path)
            seen = state["requests"].count(path)
            prefix, after, gate = state["hold"]
            held = bool(prefix) and path.startswith(prefix) and sum(p.startswith(prefix) for p in state["requests"]) > after
            state["held"] += held
        if held:
            return self._hold(gate)
        if state["latency_s"]:
            time.sleep(state["latency_s"])
        kind, _, name = path.strip("/").partition("/")
        html = b"<!doctype html><html><body>not an image</body></html>"
        if kind == "img":
            self._send(200, jpeg_bytes(name))
        elif kind == "404":
            self._send(404, b"missing", "text/plain")
        elif kind == "429":
            if seen == 1:
                self._send(429, b"slow down", "text/plain", {"Retry-After": "1"})
            else:
                self._send(200, jpeg_bytes(name))
        elif kind == "flaky":
            self._send(500, b"oops", "text/plain") if seen == 1 else self._send(200, jpeg_bytes(name))
        elif kind == "slow":
            body = jpeg_bytes(name)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            time.sleep(state["slow_s"])
            self._write_quietly(body)
        elif kind == "truncated":
            body = jpeg_bytes(name)
            self._send(200, body[: len(body) // 2], length=len(body))
            self.close_connection = True
        elif kind == "wrongtype":
            self._send(200, jpeg_bytes(name), "text/plain")
        elif kind == "html":
            self._send(200, html, "text/html; charset=utf-8")
        elif kind == "disguised":
            self._send(200, html, "image/jpeg")
        elif kind in ("loop", "loop2"):
            self._send(302, b"", "text/plain", {"Location": f"/{'loop2' if kind == 'loop' else 'loop'}/{name}"})
        elif kind == "redirect":
            self._send(302, b"", "text/plain", {"Location": f"/img/{name}.jpg"})
        elif kind == "tofile":
            self._send(302, b"", "text/plain", {"Location": "file:///etc/passwd"})
        elif kind == "big":
            self._send(200, JPEG_PREFIX + bytes(state["big_bytes"]))
        elif kind == "bigstream":
            self._stream_chunks(JPEG_PREFIX + bytes(state["big_bytes"]))
        elif kind == "gzipbomb":
            import gzip

            body = gzip.compress(JPEG_PREFIX + bytes(state["big_bytes"]))
            self._send(200, body, headers={"Content-Encoding": "gzip"})
        elif kind == "blob":
            size, _, _ = name.partition("/")
            self._send(200, self.server.blob(int(size)))
        else:
            self._send(404, b"unknown path", "text/plain")

    def _hold(self, gate: threading.Event, most_s: float = 300.0) -> None:
        """Keep the client waiting without tripping its read timeout until ``gate`` opens (or ``most_s`` passed: a
        client the test failed to kill does not wait forever), then close."""
        self.close_connection = True
        deadline = time.monotonic() + most_s
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Held: ")
            while not gate.wait(0.2) and time.monotonic() < deadline:
                self.wfile.write(b".")
        except (BrokenPipeError, ConnectionResetError):  # the client was killed: expected
            pass

    def _write_quietly(self, body: bytes) -> None:
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): expected
            pass

    def _stream_chunks(self, body: bytes, chunk: int = 1 << 16) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for start in range(0, len(body), chunk):
                part = body[start:start + chunk]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):  # the client aborted past its cap: expected
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, state: dict):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state
        self._blobs: dict[int, bytes] = {}

    def handle_error(self, request, client_address) -> None:  # clients that give up (timeouts, caps): expected
        pass

    def blob(self, size: int) -> bytes:
        if size not in self._blobs:
            rng = np.random.default_rng(size)
            self._blobs[size] = JPEG_PREFIX + rng.integers(0, 256, size - len(JPEG_PREFIX), np.uint8).tobytes()
        return self._blobs[size]


class FaultServer:
    """``with FaultServer() as server: server.url("/img/a.jpg")``; ``server.count(path)`` requests seen."""

    def __init__(self, latency_s: float = 0.0, slow_s: float = 3.0, big_bytes: int = 3 << 20):
        self.state = {"lock": threading.Lock(), "requests": [], "latency_s": latency_s, "slow_s": slow_s,
                      "big_bytes": big_bytes, "hold": ("", 0, threading.Event()), "held": 0}
        self._server = _Server(self.state)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[str]:
        with self.state["lock"]:
            return list(self.state["requests"])

    def count(self, path: str) -> int:
        return self.requests.count(path)

    def hold(self, prefix: str, after: int) -> None:
        """Requests under ``prefix`` past the first ``after`` wait until :meth:`release`."""
        with self.state["lock"]:
            self.state["hold"] = (prefix, after, threading.Event())

    def release(self) -> None:
        with self.state["lock"]:
            self.state["hold"][2].set()
            self.state["hold"] = ("", 0, threading.Event())

    @property
    def held(self) -> int:
        with self.state["lock"]:
            return self.state["held"]

    def __enter__(self) -> "FaultServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--log", default="", help="append each request path to this file")
    args = parser.parse_args()
    server = FaultServer(latency_s=args.latency)
    print(f"port {server.port}", flush=True)
    if args.log:
        original = _Handler.do_GET

        def logged(handler):
            with open(args.log, "a") as fh:
                fh.write(handler.path + "\n")
            original(handler)

        _Handler.do_GET = logged
    server._server.serve_forever()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
