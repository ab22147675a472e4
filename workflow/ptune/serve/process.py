"""Start `ptune serve api` as a separate process on a free loopback port, talk to it, stop it.

Used by the deploy stage's check and by bench/serve_load.py: the server runs exactly as a user starts it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from ..errors import PtuneError
from .server import READY_PREFIX

_URL = re.compile(r"on (http://\S+) ")


class ApiProcess:
    """`with ApiProcess(["--bundle", DIR]) as api: api.post("/", {...})`; the server listens on 127.0.0.1:0."""

    def __init__(
        self, args: list[str], cwd: str | Path | None = None, env: dict | None = None, start_timeout: float = 900
    ):
        self.args = args
        self.cwd = cwd
        self.env = {**(env or os.environ), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        self.start_timeout = start_timeout
        self.url = ""
        self.load_s = 0.0
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._tail: deque[str] = deque(maxlen=400)
        self.lines = 0  # lines of output so far (output(since=...))

    def __enter__(self) -> "ApiProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        # The serving commands alone (serve/__main__.py), as `ptune serve api` runs them.
        cmd = [sys.executable, "-m", "ptune.serve", "serve", "api", "--host", "127.0.0.1", "--port", "0", *self.args]
        t0 = time.perf_counter()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = t0 + self.start_timeout
        while not self.url:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.perf_counter()))
            except queue.Empty:
                self.stop()
                raise PtuneError(
                    f"`ptune {' '.join(cmd[3:])}` did not start within {self.start_timeout:.0f} s:\n" + self.output()
                ) from None
            if line is None:
                self.stop()
                status = self._proc.returncode
                raise PtuneError(
                    f"`ptune {' '.join(cmd[3:])}` exited with status {status} before serving:\n{self.output()}"
                )
            if line.startswith(READY_PREFIX) and (m := _URL.search(line)):
                self.url = m.group(1)
        while self.get("/health", timeout=5, check=False)[0] != 200:
            if time.perf_counter() > deadline or self._proc.poll() is not None:
                self.stop()
                raise PtuneError(f"the API server at {self.url} never answered /health:\n{self.output()}")
            time.sleep(0.1)
        self.load_s = time.perf_counter() - t0

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._tail.append(line.rstrip("\n"))
            self.lines += 1
            self._lines.put(line)
        self._proc.wait()
        self._lines.put(None)

    def output(self, since: int | None = None) -> str:
        """The server's last lines of output (stdout and stderr); `since`: only those after the first `since` lines
        (a value of `lines`)."""
        tail = list(self._tail)
        if since is not None:
            tail = tail[max(0, len(tail) - (self.lines - since)) :]
        return "\n".join(tail)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL after `timeout`; returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        headers: dict | None = None,
        timeout: float = 600,
        check: bool = True,
    ) -> tuple[int, dict]:
        """One JSON request; returns (status, decoded body). `check`: raise PtuneError on a non-2xx status."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except OSError as exc:
            if check:
                raise PtuneError(f"{method} {self.url}{path} failed: {exc}\n{self.output()}") from None
            return 0, {}
        try:
            decoded = json.loads(raw)
        except json.JSONDecodeError:
            decoded = {"raw": raw.decode(errors="replace")}
        if check and not 200 <= status < 300:
            raise PtuneError(f"{method} {self.url}{path} answered {status}: {decoded}")
        return status, decoded

    def get(self, path: str, **kwargs) -> tuple[int, dict]:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: dict, **kwargs) -> tuple[int, dict]:
        return self.request("POST", path, body, **kwargs)
