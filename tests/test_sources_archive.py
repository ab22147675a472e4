"""Hostile archives at fetch_data.source: url, built here with the real tarfile and zipfile and unpacked by the real
`extract` (and once by `ptune fetch_data`, served over HTTP on 127.0.0.1): every one is refused as
"unsafe archive: MEMBER (why)", writes nothing outside its folder and leaves nothing behind."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from ptune.errors import PtuneError
from ptune.sources import url as url_source

from conftest import make_project
from support.http_files import FileServer

ROUND = "AdvertiseGen/train.json"
GOOD = b'{"content": "x", "summary": "y"}\n'


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.mode = 0o644 if kind == tarfile.REGTYPE else 0o755
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tar(members, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, data)
    return buf.getvalue()


def symlink_chain_escape() -> bytes:
    """The shape of CVE-2025-4517: symlinks with one-letter names to folders with 247-byte names, 16 deep, so that
    the short path a/b/.../p is, written out, close to PATH_MAX. os.path.realpath cannot lstat anything below it
    ("File name too long") and stops resolving, so a link there that climbs back up (and one more level) passes
    tarfile's "data" filter as if it stayed inside; the kernel follows it, and escape/pwned lands beside the folder."""
    long_dir, members, path = "d" * 247, [], ""
    for step in "abcdefghijklmnop":
        members += [_member(path + long_dir, tarfile.DIRTYPE), _member(path + step, tarfile.SYMTYPE, linkname=long_dir)]
        path += step + "/"
    climb = path + "l" * 254
    members.append(_member(climb, tarfile.SYMTYPE, linkname="../" * 16))
    members.append(_member("escape", tarfile.SYMTYPE, linkname=climb + "/.."))
    members.append(_member("escape/pwned", data=b"written outside\n"))
    return _tar(members)


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def _zip_link(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the mode in the high bits is read
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _extract(tmp_path: Path, data: bytes, **caps) -> Path:
    archive = tmp_path / "download"
    archive.write_bytes(data)
    return url_source.extract(archive, tmp_path / "work" / "extracted", **caps)


def _assert_refused_cleanly(tmp_path: Path, data: bytes, member: str, why: str, **caps) -> None:
    with pytest.raises(PtuneError) as err:
        _extract(tmp_path, data, **caps)
    message = str(err.value)
    assert f"unsafe archive: {member}" in message and why in message, message
    assert "truncated or corrupt" not in message
    # Nothing left behind: no extracted folder, no partial one, nothing written beside them.
    assert list((tmp_path / "work").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download", "work"]


def test_the_symlink_chain_of_cve_2025_4517_is_refused_before_anything_escapes(tmp_path):
    _assert_refused_cleanly(tmp_path, symlink_chain_escape(), "'a'", "a symbolic link to 'ddd")
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.parametrize(
    "members, member, why",
    [
        ([_member("data/secret", linkname="/etc/passwd", kind=tarfile.SYMTYPE)], "'data/secret'", "symbolic link"),
        # A link that stays inside is refused too: no kind of link is ever written.
        (
            [_member("data/train.json", data=GOOD), _member("data/dev.json", tarfile.SYMTYPE, linkname="train.json")],
            "'data/dev.json'",
            "a symbolic link to 'train.json'",
        ),
        (
            [
                _member("data/train.json", data=GOOD),
                _member("data/dev.json", tarfile.LNKTYPE, linkname="data/train.json"),
            ],
            "'data/dev.json'",
            "a hard link to 'data/train.json'",
        ),
        ([_member("/tmp/ptune-absolute.json", data=GOOD)], "'/tmp/ptune-absolute.json'", "an absolute name"),
        ([_member("data/../../escaped.json", data=GOOD)], "'data/../../escaped.json'", "'..'"),
        ([_member("data/null", tarfile.CHRTYPE)], "'data/null'", "a device file"),
        ([_member("data/disk", tarfile.BLKTYPE)], "'data/disk'", "a device file"),
        ([_member("data/pipe", tarfile.FIFOTYPE)], "'data/pipe'", "a FIFO"),
        # What ended the reported run in a raw "OSError: File name too long": refused before any write.
        ([_member("data/" + "n" * 300 + ".json", data=GOOD)], "'data/nnn", "longer than 255 bytes"),
        ([_member("/".join(["p" * 200] * 8) + "/train.json", data=GOOD)], "'ppp", "a name of 1,618 bytes"),
    ],
    ids=[
        "symlink-out",
        "symlink-in",
        "hardlink",
        "absolute",
        "dotdot",
        "chardev",
        "blockdev",
        "fifo",
        "long-part",
        "long-name",
    ],
)
def test_a_tar_member_that_is_no_plain_file_or_folder_is_refused(tmp_path, members, member, why):
    _assert_refused_cleanly(tmp_path, _tar(members), member, why)
    assert not (tmp_path / "escaped.json").exists() and not Path("/tmp/ptune-absolute.json").exists()


@pytest.mark.parametrize(
    "entries, member, why",
    [
        ([_zip_link("data/secret", "/etc/passwd")], "'data/secret'", "a symbolic link"),
        ([("data/../../escaped.json", GOOD)], "'data/../../escaped.json'", "'..'"),
        ([("/abs.json", GOOD)], "'/abs.json'", "an absolute name"),
    ],
    ids=["symlink", "dotdot", "absolute"],
)
def test_a_zip_member_that_is_no_plain_file_or_folder_is_refused(tmp_path, entries, member, why):
    _assert_refused_cleanly(tmp_path, _zip(entries), member, why)
    assert not (tmp_path / "escaped.json").exists()


def test_bombs_over_the_member_or_byte_cap_stop_with_the_key_to_raise(tmp_path):
    many = _tar([_member(f"data/{i}.json", data=GOOD) for i in range(30)])
    _assert_refused_cleanly(tmp_path, many, "'data/20.json'", "fetch_data.max_archive_members", max_members=20)
    # 4 MiB of zeros in a 4 KiB download.
    zeros = _tar([_member("data/train.json", data=bytes(4 << 20))])
    assert len(zeros) < 10_000
    _assert_refused_cleanly(tmp_path, zeros, "'data/train.json'", "fetch_data.max_unpacked_bytes", max_bytes=1 << 20)
    # Several members, each under the cap, together over it: counted over the whole archive.
    parts = _zip([(f"data/{i}.bin", bytes(300_000)) for i in range(5)])
    _assert_refused_cleanly(tmp_path, parts, "'data/3.bin'", "more than 1,000,000 bytes", max_bytes=1_000_000)
    many_zip = _zip([(f"data/{i}.json", GOOD) for i in range(30)])
    _assert_refused_cleanly(tmp_path, many_zip, "'data/20.json'", "more than 20 members", max_members=20)


def test_plain_files_and_folders_unpack_within_the_caps(tmp_path):
    data = _tar([_member("AdvertiseGen", tarfile.DIRTYPE), _member(ROUND, data=GOOD), _member("./", tarfile.DIRTYPE)])
    root = _extract(tmp_path, data, max_bytes=len(GOOD), max_members=3)
    assert root.name == "AdvertiseGen" and (root / "train.json").read_bytes() == GOOD
    assert stat.S_IMODE((root / "train.json").stat().st_mode) == 0o644
    for mode in ("w", "w:bz2", "w:xz"):  # every compression tarfile reads goes through the same check
        root = _extract(tmp_path, _tar([_member(ROUND, data=GOOD)], mode=mode))
        assert (root / "train.json").read_bytes() == GOOD
    root = _extract(tmp_path, _zip([("AdvertiseGen/", b""), (ROUND, GOOD)]))
    assert (root / "train.json").read_bytes() == GOOD


def test_ptune_fetch_data_refuses_the_hostile_archive_over_http_without_a_traceback(tmp_path, env):
    data = symlink_chain_escape()
    project = make_project(tmp_path / "project", env)
    path = "/AdvertiseGen.tar.gz"
    with FileServer({path: data}) as server:
        project.set_param("fetch_data.source", "url")
        project.set_param("fetch_data.url", f"'{server.url(path)}'")
        project.set_param("fetch_data.sha256", hashlib.sha256(data).hexdigest())
        proc = project.run("ptune", "fetch_data", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "unsafe archive: 'a' (a symbolic link to 'ddd" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("pwned"))
    assert not (project.root / "data" / "raw").exists()
    state = project.root / ".ptune" / "state" / "fetch_data"
    assert [p.name for p in state.rglob("*") if "extracted" in p.name] == []
