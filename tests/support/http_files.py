"""An HTTP file server on 127.0.0.1 for tests, with Range requests and connections cut off on demand."""

from __future__ import annotations

import threading
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
    def __init__(self, files: dict[str, bytes], drops: int = 0, not_found: bytes | None = None):
        super().__init__(_Handler)
        self.files = files  # URL path -> content
        self.not_found = not_found  # a JSON body for 404s, as an API answers them (else a plain HTML error page)
        self.drops = drops  # this many downloads are cut off half-way
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)

    def url(self, path: str) -> str:
        return self.origin + path


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        with self.server.lock:
            self.server.requests.append((self.path, rng))
            drop = self.server.drops > 0
            self.server.drops -= drop
        data = self.server.files.get(self.path)
        if data is None and self.server.not_found is not None:
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.server.not_found)))
            self.end_headers()
            self.wfile.write(self.server.not_found)
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
