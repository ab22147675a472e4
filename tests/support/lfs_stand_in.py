"""Stand-ins for a model hub in tests: a git repository with Git LFS files served over file://, and a Git LFS
server on 127.0.0.1 (the batch API and object downloads, with connections cut off on demand, as when a
transfer stalls). Objects are served from memory."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from support.http_files import LoopbackServer


@dataclass
class LfsRepo:
    url: str
    commit: str
    files: dict[str, bytes]
    remote: Path

    def object_path(self, name: str) -> Path:
        oid = hashlib.sha256(self.files[name]).hexdigest()
        return self.remote / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def _run(cwd: Path, env: dict, *cmd: str) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout.strip()


def make_lfs_repo(root: Path, env: dict, lfs_url: str | None = None) -> LfsRepo:
    """A model repository like a hub's: config.json in git, weights and tokenizer model in Git LFS."""
    rng = random.Random(0)
    files = {
        "config.json": b'{"model_type": "glm"}\n',
        "model.safetensors": rng.randbytes(400_000),
        "tokenizer.model": rng.randbytes(5_000),
    }
    src = root / "src"
    src.mkdir(parents=True)
    _run(src, env, "git", "init", "-q")
    _run(src, env, "git", "lfs", "install", "--local")
    _run(src, env, "git", "lfs", "track", "*.safetensors", "*.model")
    for name, data in files.items():
        (src / name).write_bytes(data)
    if lfs_url:
        (src / ".lfsconfig").write_text(f"[lfs]\n\turl = {lfs_url}\n")
    _run(src, env, "git", "add", "-A")
    _run(src, env, "git", "commit", "-q", "-m", "weights")
    remote = root / "remote.git"
    _run(root, env, "git", "clone", "-q", "--bare", str(src), str(remote))
    if not lfs_url:
        _run(src, env, "git", "remote", "add", "origin", remote.as_uri())
        _run(src, env, "git", "lfs", "push", "--all", "origin")
    return LfsRepo(remote.as_uri(), _run(src, env, "git", "rev-parse", "HEAD"), files, remote)


class LfsServer(LoopbackServer):
    def __init__(self, objects: dict[str, bytes], drops: int = 0):
        super().__init__(_Handler)
        self.objects = objects  # oid -> content
        self.drops = drops  # this many object downloads are cut off half-way
        self.ranges: list[str | None] = []  # the Range header of each object download

    @property
    def url(self) -> str:
        return f"{self.origin}/lfs"


class _Handler(BaseHTTPRequestHandler):
    server: LfsServer

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        base = f"{self.server.origin}/objects"
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] in self.server.objects:
                entry["actions"] = {"download": {"href": f"{base}/{obj['oid']}"}}
            else:
                entry["error"] = {"code": 404, "message": "object missing on the server"}
            objects.append(entry)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.git-lfs+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        data = self.server.objects[self.path.rsplit("/", 1)[-1]]
        rng = self.headers.get("Range")
        with self.server.lock:
            self.server.ranges.append(rng)
            drop = self.server.drops > 0
            self.server.drops -= drop
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
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
            self.connection.shutdown(2)  # the transfer stalls and dies half-way
            return
        self.wfile.write(body)
