"""A stand-in for the Hugging Face hub on 127.0.0.1: the real `huggingface_hub.snapshot_download` downloads from it.

`snapshot_download(repo_id, repo_type=..., revision=...)` (huggingface_hub 2.x) makes these requests, against the
endpoint in HF_ENDPOINT (for a data set, `{type}s` is `datasets` and the file URLs start with /datasets):
  GET  /api/{type}s/{id}/revision/{rev}                         JSON: the commit (`sha`) the revision points at
  GET  /api/{type}s/{id}/tree/{commit}?recursive=true&expand=false   JSON: each file's path, size, blob id, LFS sha256
  HEAD /{prefix}{id}/resolve/{commit}/{path}                    headers: X-Repo-Commit, ETag, Content-Length
  GET  /{prefix}{id}/resolve/{commit}/{path}                    the file's bytes
(plus GET /api/agent-harnesses, a registry it asks for once a day; a 404 there is fine). A revision, repository
or file the stand-in does not have gets the hub's 404, with the X-Error-Code the hub sends (RevisionNotFound,
EntryNotFound), which huggingface_hub turns into its own errors. Files are served as LFS files (an ETag that is
their sha256), never through Xet. The routes are exact URLs, served by tests/support/http_files.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
from http.server import BaseHTTPRequestHandler

from support.http_files import FileServer, LoopbackServer

NOT_FOUND = json.dumps({"error": "not found"}).encode()


def _prefixes(repo_type: str) -> tuple[str, str]:
    """(API path segment, file URL prefix) of a repository type."""
    return f"{repo_type}s", "" if repo_type == "model" else f"{repo_type}s/"


def routes(
    repo_id: str,
    commit: str,
    files: dict[str, bytes],
    repo_type: str = "dataset",
    branches: tuple[str, ...] = ("main",),
) -> tuple[dict[str, bytes], dict[str, dict[str, str]]]:
    """(URL path -> body, URL path -> headers) of one repository (relative path -> bytes) at one commit, which each
    of `branches` points at."""
    api, prefix = _prefixes(repo_type)
    info = json.dumps(
        {
            "id": repo_id,
            "sha": commit,
            "private": False,
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
    ).encode()
    served = {f"/api/{api}/{repo_id}/revision/{rev}": info for rev in (commit, *branches)}
    tree = []
    for path, data in sorted(files.items()):
        sha256 = hashlib.sha256(data).hexdigest()
        tree.append(
            {
                "type": "file",
                "path": path,
                "size": len(data),
                "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),  # its git blob id
                "lfs": {"oid": sha256, "size": len(data), "pointerSize": 134},
            }
        )
    served[f"/api/{api}/{repo_id}/tree/{commit}?recursive=true&expand=false"] = json.dumps(tree).encode()
    headers = {}
    for path, data in files.items():
        url = f"/{prefix}{repo_id}/resolve/{commit}/{path}"
        served[url] = data
        headers[url] = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
    return served, headers


def _error_code(path: str) -> dict[str, str]:
    if "/resolve/" in path:
        return {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}
    if "/revision/" in path or "/tree/" in path:
        return {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}
    return {}


def serve(served: dict[str, bytes], headers: dict[str, dict[str, str]]) -> FileServer:
    """The hub serving `routes` (merged, for several repositories); enter it to start it. Its `url("")` is the
    HF_ENDPOINT to set; its `requests` lists what the library asked for."""
    return FileServer(served, not_found=NOT_FOUND, headers=headers, not_found_headers=_error_code)


# The upload side: what `HfApi.create_repo` and `HfApi.create_commit` (huggingface_hub 2.x) send, for files small
# enough that the stand-in answers "regular" (base64 in the commit itself; the LFS and Xet paths are not served):
#   POST /api/repos/create                          JSON {name, organization, visibility?, type}
#   POST /api/validate-yaml                         JSON {content, repoType}: README.md's card, before anything else
#   POST /api/{type}s/{id}/preupload/{revision}     JSON {files: [{path, sample, size}]} -> each file's upload mode
#   POST /api/{type}s/{id}/commit/{revision}        NDJSON: a header line, then one {key: file, value: {path,
#                                                   content (base64), encoding}} line per file


class UploadHub(LoopbackServer):
    """A hub that accepts repositories and commits, recording each request: `requests` holds (path, headers with
    lower-case names, body),
    `repos` the created repositories' payloads, `commits` each commit's files (repo -> {path: bytes})."""

    def __init__(self):
        super().__init__(_UploadHandler)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.repos: list[dict] = []
        self.commits: list[tuple[str, dict, dict[str, bytes]]] = []  # (repo id, header, files)


class _UploadHandler(BaseHTTPRequestHandler):
    server: UploadHub

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0]
        with self.server.lock:
            self.server.requests.append((path, {k.lower(): v for k, v in self.headers.items()}, body))
        if path == "/api/repos/create":
            payload = json.loads(body)
            self.server.repos.append(payload)
            repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
            self._answer(200, {"url": f"{self.server.origin}/{repo_id}", "name": repo_id})
        elif path == "/api/validate-yaml":
            self._answer(200, {"errors": [], "warnings": []})
        elif "/preupload/" in path:
            files = json.loads(body)["files"]
            self._answer(
                200,
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        elif "/commit/" in path:
            repo_id = path.removeprefix("/api/models/").split("/commit/")[0]
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            files = {
                item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in lines
                if item["key"] == "file"
            }
            with self.server.lock:
                self.server.commits.append((repo_id, header, files))
            oid = hashlib.sha1(body).hexdigest()
            self._answer(200, {"commitUrl": f"{self.server.origin}/{repo_id}/commit/{oid}", "commitOid": oid})
        else:
            self._answer(404, {"error": "not found"})
