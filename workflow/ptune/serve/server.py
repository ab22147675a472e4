"""Run an ASGI app with uvicorn on an already bound socket, and say where it listens in one parseable line."""

from __future__ import annotations

import socket

import uvicorn

# The line `ptune serve api` prints once it listens; deploy and the tests read the URL from it.
READY_PREFIX = "ptune api: serving"


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app, sock: socket.socket, engine) -> int:
    url = url_of(sock)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    print(
        f"{READY_PREFIX} {engine.name} ({engine.description}) on {url} (OpenAI base URL {url}/v1); Ctrl-C stops it",
        flush=True,
    )
    server.run(sockets=[sock])
    return 0
