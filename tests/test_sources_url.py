"""Source url: the AdvertiseGen.tar.gz download, from an HTTP server on 127.0.0.1 serving an archive built from
the real ADGEN sample; resume after interruption, checksums, archives that are not or no longer archives."""

from __future__ import annotations

import hashlib
import io
import tarfile
from http.server import BaseHTTPRequestHandler

import pytest

from ptune.errors import PtuneError
from ptune.sources import url as url_source

from conftest import ADGEN_SAMPLE, make_project
from support.http_files import FileServer, LoopbackServer

ARCHIVE = "/f/b3f119a008264b1cabd1/?dl=1"  # the path of the tutorial's link, served here


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def adgen_archive() -> bytes:
    """AdvertiseGen.tar.gz as the tutorial ships it: AdvertiseGen/train.json and dev.json."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("train.json", "dev.json"):
            tar.add(ADGEN_SAMPLE / name, arcname=f"AdvertiseGen/{name}")
    return buf.getvalue()


def test_fetch_data_from_url_writes_adgen_unchanged_after_the_checksum_is_set(adgen_archive, tmp_path, env):
    project = make_project(tmp_path / "project", env)
    with FileServer({ARCHIVE: adgen_archive}) as server:
        project.set_param("fetch_data.source", "url")
        project.set_param("fetch_data.url", f"'{server.url(ARCHIVE)}'")
        first = project.run("ptune", "fetch_data", check=False)
        # No checksum yet: refused, with the sha256 of what came, to check and set.
        assert first.returncode == 2
        assert f"has sha256 {_sha(adgen_archive)}" in first.stderr and "fetch_data.sha256" in first.stderr
        assert not (project.root / "data" / "raw").exists()
        project.set_param("fetch_data.sha256", _sha(adgen_archive))
        project.run("ptune", "fetch_data")
        assert len(server.requests) == 1, "the checked download was fetched again"
    raw = project.root / "data" / "raw"
    assert (raw / "dev.json").read_bytes() == (ADGEN_SAMPLE / "dev.json").read_bytes()
    assert (raw / "train.json").read_bytes() == (ADGEN_SAMPLE / "train.json").read_bytes()
    assert not list((project.root / ".ptune" / "state" / "fetch_data").iterdir()), "resume state left behind"


def test_an_interrupted_download_resumes_with_a_range_request(adgen_archive, tmp_path):
    dest = tmp_path / "download"
    with FileServer({ARCHIVE: adgen_archive}, drops=1) as server:
        url_source.download(server.url(ARCHIVE), dest, _sha(adgen_archive), backoff_s=0)
    assert dest.read_bytes() == adgen_archive
    (_, first), (_, second) = server.requests
    assert first is None and second == f"bytes={len(adgen_archive) // 2}-"


def test_a_partial_download_left_by_a_killed_run_is_continued(adgen_archive, tmp_path):
    dest = tmp_path / "download"
    kept = len(adgen_archive) // 2
    dest.with_name("download.part").write_bytes(adgen_archive[:kept])
    with FileServer({ARCHIVE: adgen_archive}) as server:
        url_source.download(server.url(ARCHIVE), dest, _sha(adgen_archive), backoff_s=0)
    assert dest.read_bytes() == adgen_archive
    assert server.requests == [(ARCHIVE, f"bytes={kept}-")]


def test_a_wrong_checksum_names_expected_and_actual(adgen_archive, tmp_path):
    wrong = "0" * 64
    with FileServer({ARCHIVE: adgen_archive}) as server:
        with pytest.raises(PtuneError) as err:
            url_source.download(server.url(ARCHIVE), tmp_path / "download", wrong, backoff_s=0)
    assert f"has sha256 {_sha(adgen_archive)}, expected {wrong}" in str(err.value)
    assert not (tmp_path / "download").exists()


def test_a_missing_file_fails_at_once(tmp_path):
    with FileServer({}) as server:
        with pytest.raises(PtuneError, match="answered HTTP 404"):
            url_source.download(server.url("/nope.tar.gz"), tmp_path / "download", "0" * 64, backoff_s=0)
    assert len(server.requests) == 1


def test_an_archive_unpacks_to_its_single_folder(adgen_archive, tmp_path):
    archive = tmp_path / "download"
    archive.write_bytes(adgen_archive)
    root = url_source.extract(archive, tmp_path / "x")
    assert root.name == "AdvertiseGen" and sorted(p.name for p in root.iterdir()) == ["dev.json", "train.json"]


def test_a_web_page_instead_of_an_archive_fails_clearly(tmp_path):
    archive = tmp_path / "download"
    archive.write_bytes(b"<!DOCTYPE html><html><body>Please log in</body></html>")
    with pytest.raises(PtuneError, match="not a tar or zip archive .*an HTML page"):
        url_source.extract(archive, tmp_path / "x")


def test_a_truncated_archive_fails_clearly(adgen_archive, tmp_path):
    archive = tmp_path / "download"
    archive.write_bytes(adgen_archive[: len(adgen_archive) * 2 // 3])
    with pytest.raises(PtuneError, match="truncated or corrupt"):
        url_source.extract(archive, tmp_path / "x")
    assert not (tmp_path / "x").exists()


class _Redirect(BaseHTTPRequestHandler):
    """Answers every GET with a 302 to the server's `location`."""

    server: LoopbackServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.server.location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_plain_http_to_another_machine_is_refused_before_any_request(tmp_path):
    for url in ("http://example.com/AdvertiseGen.tar.gz", "ftp://example.com/AdvertiseGen.tar.gz"):
        with pytest.raises(PtuneError, match=r"fetch_data.url: .* is refused: .*(plain http|only https)"):
            url_source.download(url, tmp_path / "download", "0" * 64, attempts=1, backoff_s=0)
    assert not list(tmp_path.iterdir())


def test_a_redirect_to_plain_http_elsewhere_is_refused(tmp_path):
    """An https URL answering 302 to http://elsewhere would downgrade the download; the same rule applies."""
    with LoopbackServer(_Redirect) as server:
        server.location = "http://mirror.invalid/AdvertiseGen.tar.gz"
        with pytest.raises(PtuneError, match=r"redirects \(HTTP 302\) to http://mirror.invalid/.* plain http"):
            url_source.download(server.origin + "/a.tgz", tmp_path / "download", "0" * 64, attempts=1, backoff_s=0)
        server.location = "ftp://mirror.invalid/AdvertiseGen.tar.gz"  # urllib follows ftp; file:// it refuses itself
        with pytest.raises(PtuneError, match=r"redirects \(HTTP 302\) to ftp://mirror.invalid/.* only https"):
            url_source.download(server.origin + "/a.tgz", tmp_path / "download", "0" * 64, attempts=1, backoff_s=0)
