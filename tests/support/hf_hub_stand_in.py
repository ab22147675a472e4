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

import hashlib
import json

from support.http_files import FileServer

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
