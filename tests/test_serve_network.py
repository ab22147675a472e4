"""The network edge of `ptune serve api` and `ptune serve web` (ptune.serve.edge, ptune.serve.server), attacked
through the real servers on 127.0.0.1:

- DNS rebinding: a request whose Host is another site's name (`attacker.example`, re-pointed at this machine) gets
  400 from both servers, the page's config included; IP addresses, localhost, this machine's name and the names
  listed with --allowed-hosts are answered;
- cross-origin use of the page: reached by a non-loopback name (a LAN address, this machine's name), the page used
  to grant `https://evil.example` credentialed CORS; now only --allowed-origins get it;
- 300 connections that send nothing, half a request head or half a body, which used to stay open for good: past
  --max-connections a request gets 503, each slow one is closed once --request-timeout passes, an idle keep-alive
  connection once --keep-alive-timeout passes, and the server answers again afterwards.

Each server runs once for the module, with small limits so that the waits stay short.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest

from ptune.serve.server import READY_PREFIX, WEB_READY_PREFIX

PROXY = "proxy.example"  # a reverse proxy's public name, listed with --allowed-hosts
FRIEND = "https://friend.example"  # a site listed with --allowed-origins
EVIL = "https://evil.example"
LAN = "192.0.2.10"  # an address of this machine on a network (TEST-NET-1): not loopback
USER, PASSWORD = "ptune", "s3cret"
MAX_CONNECTIONS = 40
REQUEST_TIMEOUT_S = 2
KEEP_ALIVE_S = 1
HELD = 300  # connections opened and left hanging
EDGE_FLAGS = [
    "--allowed-hosts",
    f"other.example,{PROXY}",
    "--max-connections",
    str(MAX_CONNECTIONS),
    "--request-timeout",
    str(REQUEST_TIMEOUT_S),
    "--keep-alive-timeout",
    str(KEEP_ALIVE_S),
]


class Server:
    """`ptune serve FRONTEND --port 0 ...` as a user starts it; `port` from the line it prints once it listens
    (`wait`), so that two servers load at once."""

    def __init__(self, project, frontend: str, *args: str, env: dict | None = None):
        self.frontend = frontend
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ptune.cli", "serve", frontend, "--port", "0", *args],
            cwd=project.root,
            env={**project.env, **(env or {}), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._urls: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self._urls,), daemon=True).start()

    def wait(self) -> Server:
        try:
            url = self._urls.get(timeout=300)
        except queue.Empty:
            url = None
        if url is None:
            self.stop()
            raise AssertionError(f"ptune serve {self.frontend} did not start:\n" + self.output())
        self.port = int(url.rstrip("/").rsplit(":", 1)[1])
        return self

    def _read(self, urls: queue.Queue) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith((READY_PREFIX, WEB_READY_PREFIX)):
                urls.put(line.split(" on ", 1)[1].split()[0])
        urls.put(None)

    def output(self) -> str:
        return "".join(self.lines[-60:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ask(port: int, method: str, path: str, host: str, headers: dict | None = None, body: bytes | None = None):
    """One request with this Host header; (status, headers with lower-case names, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def servers(serving_project):
    """The API and the page (with a login), started together."""
    started = [
        Server(serving_project, "api", "--bundle", "models/deploy", *EDGE_FLAGS),
        Server(
            serving_project,
            "web",
            "--bundle",
            "models/deploy",
            "--allowed-origins",
            FRIEND,
            *EDGE_FLAGS,
            env={"PTUNE_WEB_AUTH": f"{USER}:{PASSWORD}"},
        ),
    ]
    try:
        yield [server.wait() for server in started]
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def api(servers):
    return servers[0]


@pytest.fixture(scope="module")
def web(servers):
    return servers[1]


def test_both_servers_refuse_another_sites_host_name(api, web):
    """DNS rebinding: `POST /` with `Host: attacker.example:PORT` used to answer 200, and the page served itself to
    any Host; now 400 with a JSON error naming the host and --allowed-hosts, before any work (or login)."""
    prompt = json.dumps({"prompt": "类型#裤", "max_new_tokens": 1}).encode()
    for port, method, path, body in (
        (api.port, "POST", "/", prompt),
        (api.port, "GET", "/health", None),
        (web.port, "GET", "/", None),
        (web.port, "GET", "/config", None),
        (web.port, "POST", "/login", b"username=ptune&password=s3cret"),
    ):
        for host in (f"attacker.example:{port}", "attacker.example", "localhost.attacker.example", "[::1"):
            status, _, raw = ask(port, method, path, host, {"Content-Type": "application/json"}, body)
            assert status == 400, (port, path, host, status)
            error = json.loads(raw)["error"]
            assert error["param"] == "Host" and error["code"] == "host_not_allowed"
            assert host[:6] in error["message"] and "--allowed-hosts" in error["message"]
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as two:
        two.sendall(b"GET /health HTTP/1.1\r\nHost: attacker.example\r\nHost: 127.0.0.1\r\n\r\n")
        assert two.recv(65536).startswith(b"HTTP/1.1 400 ")
    # Accepted: IP addresses (v4, v6, with or without a port), localhost, this machine's name, the names listed.
    accepted = ("127.0.0.1", LAN, "[::1]", f"[::1]:{api.port}", "localhost", "LocalHost.", socket.gethostname(), PROXY)
    for host in accepted:
        for port, path in ((api.port, "/health"), (web.port, "/")):
            assert ask(port, "GET", path, host)[0] == 200, (host, path)
    assert ask(api.port, "POST", "/", f"{PROXY}:443", {"Content-Type": "application/json"}, prompt)[0] == 200


def test_the_mounted_page_keeps_its_login(web):
    """Mounted in an app of ptune's own, the page still asks for --auth (PTUNE_WEB_AUTH) before it serves its
    config, and a login there opens it, through a reverse proxy's name too."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert ask(web.port, "GET", "/config", PROXY)[0] == 401
    assert ask(web.port, "POST", "/login", PROXY, form, f"username={USER}&password=wrong".encode())[0] == 400
    status, headers, _ = ask(web.port, "POST", "/login", PROXY, form, f"username={USER}&password={PASSWORD}".encode())
    assert status == 200 and "access-token" in headers["set-cookie"]
    cookie = headers["set-cookie"].split(";", 1)[0]
    status, _, config = ask(web.port, "GET", "/config", PROXY, {"Cookie": cookie})
    assert status == 200 and json.loads(config)["components"]


def test_the_page_grants_cross_origin_use_only_to_the_origins_listed(web):
    """Reached by a non-loopback name, Gradio's own CORS middleware granted any origin credentialed CORS; mounted
    under Starlette's CORSMiddleware, the page grants it to --allowed-origins only."""
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for host in (f"{LAN}:{web.port}", socket.gethostname(), PROXY):
        status, headers, _ = ask(web.port, "OPTIONS", "/gradio_api/queue/join", host, {"Origin": EVIL, **preflight})
        assert "access-control-allow-origin" not in headers, (host, status, headers)
        headers = ask(web.port, "GET", "/", host, {"Origin": EVIL})[1]
        assert "access-control-allow-origin" not in headers, (host, headers)
        status, headers, _ = ask(web.port, "OPTIONS", "/gradio_api/queue/join", host, {"Origin": FRIEND, **preflight})
        assert status == 200 and headers["access-control-allow-origin"] == FRIEND, (host, status, headers)
        assert headers["access-control-allow-credentials"] == "true"


def _closed_by(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes `sock` before `deadline` (what it sends meanwhile, a 503 say, is read and dropped)."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def test_connections_are_capped_and_slow_or_idle_ones_closed(api, web):
    """300 connections left hanging (nothing sent, half a request head, a head and half a body) all stayed open, and
    nothing capped them. Now a request past --max-connections gets 503 at once; every hanging connection is closed
    once --request-timeout has passed (the page's too), an idle keep-alive one after --keep-alive-timeout; then
    both servers answer as before. A request head still unfinished past 16 KiB is refused."""
    idle = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    idle.request("GET", "/health")
    assert idle.getresponse().read() and idle.sock is not None  # kept alive, then left idle
    stubs = [
        b"",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        b'POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{"pro',
    ]
    held = [socket.create_connection(("127.0.0.1", web.port))]
    try:
        for i in range(HELD):
            held.append(socket.create_connection(("127.0.0.1", api.port)))
            held[-1].sendall(stubs[i % len(stubs)])
        status, _, body = ask(api.port, "GET", "/health", "127.0.0.1")
        assert status == 503, (status, body)
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 15  # generous: a loaded machine
        assert _closed_by(idle.sock, deadline), "an idle keep-alive connection stayed open"
        still_open = [i for i, s in enumerate(held) if not _closed_by(s, deadline)]
        assert not still_open, f"{len(still_open)} of {len(held)} hanging connections stayed open"
    finally:
        for s in held:
            s.close()
        idle.close()
    for port, path in ((api.port, "/health"), (web.port, "/")):
        assert ask(port, "GET", path, "127.0.0.1")[0] == 200
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as big:
        big.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"x" * (17 << 10))  # and no end
        assert big.recv(65536).startswith(b"HTTP/1.1 400 ")
    assert api.proc.poll() is None and web.proc.poll() is None


def test_share_and_any_origin_are_refused(serving_project):
    """`--share` (Gradio's public link needs Gradio's own server and its CORS) and `--allowed-origins '*'` (any site
    under the users' login) stop with a message saying what to do instead, before anything loads."""
    for flags, expected in (
        (["--share"], "--share is not offered"),
        (["--allowed-origins", "*"], "list the origins that may call the page"),
    ):
        proc = serving_project.run(sys.executable, "-m", "ptune.cli", "serve", "web", *flags, check=False)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
