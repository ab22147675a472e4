"""Run an ASGI app with uvicorn on an already bound socket, within the network edge's limits, and say where it
listens in one parseable line. Both servers (`ptune serve api`, `ptune serve web`) run here, so every connection
meets the same limits:

- the Host header must name this server (edge.py: DNS rebinding);
- at most `--max-connections` (200) connections at once: a request on one past them gets 503 at once, and the
  server keeps answering the others (without a cap, each open connection costs a file descriptor and memory);
- a request must arrive whole, head and body, within `--request-timeout` (30 s) of its first byte (of the connection
  opening, for the first): uvicorn times out only a connection idle between two requests, so a client that connects
  and sends nothing, or sends a byte now and then (slowloris), would otherwise hold its place forever. Answering is
  never timed: a long answer, streamed or not, is bounded by the engine's own limits;
- a connection idle between two requests is closed after `--keep-alive-timeout` (5 s);
- a request head (request line and headers) still unfinished past MAX_HEAD_BYTES is refused with 400: h11 buffers
  no more of it (a whole head that arrives in one read is parsed whatever its size, up to one read's 256 KiB).

The protocol is HTTP/1.1 through h11, whatever else is installed (the limits above are set for it), and neither
server speaks WebSocket: an installed websockets library adds nothing a client can reach.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .edge import DEFAULT_REQUEST_TIMEOUT_S, Edge, HostCheck

# The line `ptune serve api` prints once it listens; deploy and the tests read the URL from it.
READY_PREFIX = "ptune api: serving"
# The same for `ptune serve web`.
WEB_READY_PREFIX = "ptune web: serving"
# h11's own default, set here so that it is named: far above what browsers and HTTP clients send (a few KiB).
MAX_HEAD_BYTES = 16 << 10


class TimedConnection(H11Protocol):
    """uvicorn's HTTP/1.1 connection with a deadline for each request to arrive whole. The clock starts when the
    connection opens or a new request's first byte arrives, and stops once that request's head and body are in;
    past the deadline the connection is closed (an app still reading the body sees the client leave)."""

    request_timeout = DEFAULT_REQUEST_TIMEOUT_S
    _clock = None  # the pending close, while a request is arriving
    _timed_after = None  # uvicorn's request cycle before the timed request: a new one means its head is in

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_clock()

    def data_received(self, data: bytes) -> None:
        if self._clock is None and (self.cycle is None or self.cycle.response_complete):
            self._start_clock()  # the first byte of the next request
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._timed_after and not cycle.more_body:
            self._stop_clock()  # its head started a new cycle, and its body has ended

    def connection_lost(self, exc) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def _start_clock(self) -> None:
        self._timed_after = self.cycle
        self._clock = self.loop.call_later(self.request_timeout, self._too_slow)

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    def _too_slow(self) -> None:
        self._clock = None
        if not self.transport.is_closing():
            self.transport.close()


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server, which calls `stopping` as it begins to shut down, before it waits for open requests."""

    def __init__(self, config: uvicorn.Config, stopping: Callable[[], None] | None):
        super().__init__(config)
        self.stopping = stopping

    async def shutdown(self, sockets=None) -> None:
        if self.stopping is not None:
            self.stopping()
        await super().shutdown(sockets)


def run(app, sock: socket.socket, edge: Edge, ready: str, stopping: Callable[[], None] | None = None) -> int:
    """Serve `app` on `sock` within `edge` until Ctrl-C or SIGTERM; `ready` is printed once the socket listens,
    `stopping` is called when the server begins to stop (to end the app's endless streams)."""

    class Connection(TimedConnection):
        request_timeout = edge.request_timeout_s

    config = uvicorn.Config(
        HostCheck(app, edge.hosts),
        http=Connection,
        ws="none",
        # uvicorn counts the connection that asks among the open ones: one more lets in --max-connections, not one less.
        limit_concurrency=edge.max_connections + 1,
        timeout_keep_alive=edge.keep_alive_s,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    server = _Server(config, stopping)
    print(ready, flush=True)
    server.run(sockets=[sock])
    return 0
