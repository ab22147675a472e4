"""A stand-in for the ModelScope hub on 127.0.0.1: the real `modelscope.snapshot_download` downloads from it.

`snapshot_download(model_id, revision=...)` (modelscope 1.40 over modelscope-hub 0.5) makes two kinds of request
for a model repository, against the endpoint in MODELSCOPE_ENDPOINT:
  GET /api/v1/models/{id}/repo/files?Revision={rev}&Recursive=True   a JSON listing: each file's path, size, sha256
  GET /api/v1/models/{id}/repo?Revision={rev}&FilePath={path}        one file's bytes
and for a data set (`repo_type="dataset"`), a listing by pages of 200 files, then the files:
  GET /api/v1/datasets/{id}/repo/tree?Revision={rev}&Recursive=True&PageNumber=1&PageSize=200
  GET /api/v1/datasets/{id}/repo?Revision={rev}&FilePath={path}
(plus GET /api/v1/repos/internalAccelerationInfo, a cloud-region probe; a 404 there means "not inside a cloud").
The library checks each downloaded file against the listing's sha256 (a damaged one is retried, then fails
naming it). Anything else, and any other revision, gets the hub's JSON 404. The routes are exact URLs, served
by tests/support/http_files.py.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import urlencode

from support.http_files import FileServer

# The hub's answer to a repository or revision it does not have (modelscope-hub reads Code and Message).
NOT_FOUND = json.dumps({"Code": 10010205001, "Message": "not found", "Success": False}).encode()


def _api(repo_id: str, what: str, kind: str = "models", **query: str) -> str:
    return f"/api/v1/{kind}/{repo_id}/{what}?{urlencode(query)}"


def routes(repo_id: str, revision: str, files: dict[str, bytes], repo_type: str = "model") -> dict[str, bytes]:
    """URL path -> body for one repository (relative path -> bytes) at one revision; `repo_type` model or dataset
    (fewer than 200 files: one page of listing)."""
    kind = f"{repo_type}s"
    listing = [
        {
            "Name": path.rsplit("/", 1)[-1],
            "Path": path,
            "Type": "blob",
            "Size": len(data),
            "Sha256": hashlib.sha256(data).hexdigest(),
            "Revision": revision,
        }
        for path, data in sorted(files.items())
    ]
    body = json.dumps({"Code": 200, "Success": True, "Data": {"Files": listing}}).encode()
    if repo_type == "model":
        served = {_api(repo_id, "repo/files", Revision=revision, Recursive="True"): body}
    else:
        page = {"Revision": revision, "Recursive": "True", "PageNumber": "1", "PageSize": "200"}
        served = {_api(repo_id, "repo/tree", kind, **page): body}
    for path, data in files.items():
        served[_api(repo_id, "repo", kind, Revision=revision, FilePath=path)] = data
    return served


def serve(served: dict[str, bytes]) -> FileServer:
    """The hub serving `served` (merged `routes` of one or more revisions); enter it to start it. Its `url("")` is
    the MODELSCOPE_ENDPOINT to set; its `requests` lists what the library asked for."""
    return FileServer(served, not_found=NOT_FOUND)
