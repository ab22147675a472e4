"""An HTTP file server on 127.0.0.1 for tests, with Range requests, HEAD, extra headers per path (as a hub's API
sends them) and connections cut off on demand."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP server on a free 127.0.0.1 port, serving while its `with` block runs."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        super().__init__(("127.0.0.1", 0), handler)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class FileServer(LoopbackServer):
    def __init__(
        self,
        files: dict[str, bytes],
        drops: int = 0,
        not_found: bytes | None = None,
        headers: dict[str, dict[str, str]] | None = None,
        not_found_headers: Callable[[str], dict[str, str]] | None = None,
    ):
        super().__init__(_Handler)
        self.files = files  # URL path -> content
        self.not_found = not_found  # a JSON body for 404s, as an API answers them (else a plain HTML error page)
        self.headers = headers or {}  # URL path -> extra response headers (GET and HEAD)
        self.not_found_headers = not_found_headers  # URL path -> extra headers of its JSON 404
        self.drops = drops  # this many downloads are cut off half-way
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header); HEAD requests as "HEAD path"

    def url(self, path: str) -> str:
        return self.origin + path


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        """What GET would answer, without the body (a 404's JSON body included)."""
        with self.server.lock:
            self.server.requests.append((f"HEAD {self.path}", None))
        data = self.server.files.get(self.path)
        if data is None:
            self._not_found(body=False)
            return
        self.send_response(200)
        self._extra_headers()
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()

    def _extra_headers(self) -> None:
        for name, value in self.server.headers.get(self.path, {}).items():
            self.send_header(name, value)

    def _not_found(self, body: bool = True) -> None:
        if self.server.not_found is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        for name, value in (self.server.not_found_headers or (lambda _: {}))(self.path).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(self.server.not_found)))
        self.end_headers()
        if body:
            self.wfile.write(self.server.not_found)

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        with self.server.lock:
            self.server.requests.append((self.path, rng))
            drop = self.server.drops > 0
            self.server.drops -= drop
        data = self.server.files.get(self.path)
        if data is None and self.server.not_found is not None:
            self._not_found()
            return
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if start >= len(data) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        self._extra_headers()
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if drop:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)
