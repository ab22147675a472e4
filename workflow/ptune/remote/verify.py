"""After a push, the remote is looked at, not trusted: every object the push was to send is there, whole.

DVC counts an object as pushed when its upload call returned, and on the next push as there when the remote says
it exists: it never compares sizes, and it takes a directory as complete when the directory's listing (its `.dir`
object) is on the remote. So a remote that drops an upload (DVC #10643: ossfs reported files over 100 MiB pushed
and never uploaded them) or an object that vanished or was cut short later stays lost through any number of
`dvc push`, each one saying "Everything is up to date". ptune therefore lists the remote after each push and
compares, for each object, what is there with this instance's cache:

- an object that is missing or of another size is sent again from the cache (after checking its hash there), once,
  with a WARNING naming it; what is still wrong after that fails the push (PtuneError, exit 2), naming each file by
  its stage and path, with what to do;
- the run-cache entries (`runs/`), which DVC copies one by one and whose failures it only logs, are checked too.

Cost: one listing per object folder involved (`files/md5/XX/`, at most 256 however many objects; each listing is
paginated by the remote, 1000 keys a page on S3/OSS) plus one recursive listing of `runs/`; no object is read.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from ..errors import PtuneError

log = logging.getLogger(__name__)

_LISTINGS_AT_ONCE = 16


@dataclass(frozen=True)
class Expected:
    """One object a push was to leave on the remote."""

    what: str  # as the user knows it: "train: models/ptuning/prefix.safetensors", "run-cache entry ..."
    fs: Any  # the remote's DVC filesystem
    path: str  # where it lies there
    local: str | None = None  # this instance's copy, to send again; None where there is none
    size: int | None = None  # the copy's size; None: no copy here (then only its presence is checked)
    cache: Any = None  # the DVC cache holding the copy, and the copy's id there: checked before it is sent again
    oid: str | None = None


@dataclass(frozen=True)
class Problem:
    item: Expected
    found: int | None  # its size on the remote; None: not there

    def describe(self) -> str:
        state = "not on the remote" if self.found is None else f"{self.found} bytes on the remote"
        here = f"{self.item.size} bytes here" if self.item.size is not None else "no copy on this instance"
        return f"{self.item.what}: {state}, {here} ({self.item.path})"


def _in_cache(cache, oid: str) -> tuple[str | None, int | None]:
    path = cache.oid_to_path(oid)
    try:
        return path, os.path.getsize(path)
    except OSError:
        return None, None


def _remotes(repo):
    """name -> DVC's Remote, made once (each has its own filesystem object; the listings group by it)."""
    made = {}

    def get(name: str | None):
        if name not in made:
            made[name] = repo.cloud.get_remote(name, "push")
        return made[name]

    return get


def dvc_objects(repo, remote: str | None, _get=None, stage: str | None = None) -> list[Expected]:
    """Every object `dvc push` sends for the workspace: each cached output of dvc.yaml's stages and .dvc files (not
    those marked `push: false`), a directory's listing and each file in it, to the output's own remote if it names
    one, else to `remote` (None: the default). `stage`: that stage's outputs only (`dvc push STAGE`; a pod's
    dvc.lock names other stages' outputs that it does not hold)."""
    from dvc.cachemgr import LEGACY_HASH_NAMES
    from dvc.stage import PipelineStage

    get = _get or _remotes(repo)
    found: dict[tuple[int, str], Expected] = {}
    for out in repo.index.outs:
        if not (out.use_cache and out.can_push and out.hash_info and out.hash_info.value):
            continue
        if stage is not None and out.stage.addressing != stage:
            continue
        target = get(out.remote or remote)
        odb = target.legacy_odb if out.hash_name in LEGACY_HASH_NAMES else target.odb
        name = f"{out.stage.addressing}: {out}" if isinstance(out.stage, PipelineStage) else str(out)
        items = [(name, out.hash_info.value)]
        if out.hash_info.isdir:
            tree = out.get_obj()  # the listing, from this instance's cache; None where it is not here
            items += [(f"{name}/{'/'.join(key)}", oid.value) for key, _, oid in tree or ()]
        for what, oid in items:
            path = odb.oid_to_path(oid)
            if (id(odb.fs), path) in found:  # the same bytes in two outputs: one object, named once
                first = found[(id(odb.fs), path)]
                found[(id(odb.fs), path)] = replace(first, what=f"{first.what} (the same bytes as {what})")
                continue
            local, size = _in_cache(out.cache, oid)
            found[(id(odb.fs), path)] = Expected(what, odb.fs, path, local, size, out.cache, oid)
    return list(found.values())


def run_cache_entries(repo, remote: str | None, _get=None) -> list[Expected]:
    """Every run-cache entry here (`dvc push --run-cache` sends them all), and where it lies on the remote."""
    local = repo.cache.legacy
    runs = local.fs.join(local.path, "runs")
    if not local.fs.exists(runs):
        return []
    odb = (_get or _remotes(repo))(remote).legacy_odb  # DVC's stage cache pushes to the remote's root
    found = []
    for path in local.fs.find(runs):
        rel = local.fs.relparts(path, local.path)
        entry = f"run-cache entry {'/'.join(rel[1:])}"
        found.append(Expected(entry, odb.fs, odb.fs.join(odb.path, *rel), path, os.path.getsize(path)))
    return found


def _listing(fs, folder: str, recursive: bool) -> dict[str, int]:
    """path -> size of every file in `folder` on the remote (empty where the folder is not there)."""
    try:
        if recursive:
            entries = fs.fs.find(folder, detail=True)
            if not isinstance(entries, dict):  # DVC's local filesystem finds names only
                entries = {path: fs.fs.info(path) for path in entries}
            entries = list(entries.values())
        else:
            entries = fs.fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/"): e.get("size") for e in entries if e.get("type") != "directory"}


def check(expected: list[Expected], recursive_roots: dict[int, str] | None = None) -> list[Problem]:
    """What of `expected` the remote lacks or holds at another size: one listing per folder the objects lie in,
    or one recursive listing of a root given for a filesystem (`recursive_roots`: id(fs) -> root)."""
    roots = recursive_roots or {}
    folders: dict[tuple[int, str], tuple[object, str, bool]] = {}
    for item in expected:
        root = roots.get(id(item.fs))
        folder, recursive = (root, True) if root and item.path.startswith(root) else (item.fs.parent(item.path), False)
        folders[(id(item.fs), folder)] = (item.fs, folder, recursive)
    for fs, _, _ in folders.values():
        # fsspec remembers listings (s3fs's dircache): one made before the push would answer for the remote now.
        fs.fs.invalidate_cache()
    with ThreadPoolExecutor(_LISTINGS_AT_ONCE) as pool:
        listed = pool.map(lambda f: _listing(*f), folders.values())
        sizes: dict[tuple[int, str], int] = {}
        for (fs_id, _), listing in zip(folders, listed):
            sizes.update(((fs_id, path), size) for path, size in listing.items())
    problems = []
    for item in expected:
        found = sizes.get((id(item.fs), item.path.rstrip("/")))
        if found is None or (item.size is not None and found != item.size):
            problems.append(Problem(item, found))
    return problems


def _resend(problems: list[Problem]) -> None:
    """Send each damaged or missing object again from this instance's copy, where a sound one is here."""
    for problem in problems:
        item = problem.item
        if item.local is None:
            continue
        if item.cache is not None:
            try:
                item.cache.check(item.oid)  # DVC rehashes it: a copy damaged here must not replace the remote's
            except Exception as exc:
                log.warning("not sending %s again: this instance's copy is damaged too (%s)", item.what, exc)
                continue
        try:
            item.fs.put_file(item.local, item.path)
        except Exception as exc:  # the check that follows names it
            log.warning("could not send %s again: %s", item.what, exc)


def explain(problems: list[Problem], where: str, resent: bool) -> str:
    """What is wrong, object by object, and what to do; `resent`: ptune sent them again already."""
    listing = "\n".join(f"  {p.describe()}" for p in problems)
    lost_here = [p for p in problems if p.item.local is None]
    advice = []
    if len(lost_here) < len(problems):
        advice.append(
            "ptune sent these again from this instance and the remote still lacks them: the remote drops or cuts "
            "uploads (DVC #10643 is one such bug; a quota, a lifecycle rule or a proxy are others). Keep this "
            "instance and its .dvc/cache until that is fixed, then run `ptune push` again."
            if resent
            else "The error above says why; once that is fixed, `ptune push` sends them (and checks them there)."
        )
    if lost_here:
        advice.append(
            "A file with no copy on this instance was never pushed from here: run `ptune push` on the instance that "
            "computed it, or recompute it here (`snakemake --cores 1 report`) and push."
        )
    head = f"{where} lacks {len(problems)} object(s) or holds them cut short"
    return f"{head}:\n{listing}\n{' '.join(advice)}"


def verify(expected: list[Expected], where: str, recursive_roots: dict[int, str] | None = None) -> int:
    """Check `expected` on the remote; send what is missing or short again, once; raise a PtuneError naming what is
    still wrong. Returns the number of objects checked."""
    problems = check(expected, recursive_roots)
    if problems:
        log.warning(
            "%s lacks %d object(s) that the push counted as sent; sending again those this instance holds:\n%s",
            where,
            len(problems),
            "\n".join(f"  {p.describe()}" for p in problems),
        )
        _resend(problems)
        problems = check([p.item for p in problems], recursive_roots)
        if problems:
            raise PtuneError(explain(problems, where, resent=True))
        log.warning("%s: each of them is there now, whole", where)
    return len(expected)


def verify_dvc_push(repo, remote: str | None, where: str, stage: str | None = None) -> None:
    """Check what `dvc push --run-cache [STAGE]` was to send: every output's objects (of `stage` only, if given) and
    every run-cache entry."""
    get = _remotes(repo)
    objects = dvc_objects(repo, remote, get, stage)
    runs = run_cache_entries(repo, remote, get)
    odb = get(remote).legacy_odb
    verify(objects + runs, where, {id(odb.fs): odb.fs.join(odb.path, "runs")})
    log.info(
        "checked on %s: %d object(s) and %d run-cache entries, each there with its size", where, len(objects), len(runs)
    )


def lost(fs, sizes: dict[str, int]) -> set[str]:
    """The paths of `sizes` (path -> size) that the remote lacks or holds at another size."""
    return {p.item.path for p in check([Expected(path, fs, path, size=size) for path, size in sizes.items()])}


def missing_after_failure(repo, remote: str | None) -> list[Problem]:
    """After a failed `dvc push`: what the remote lacks, to name it (empty where the remote cannot be listed)."""
    try:
        return check(dvc_objects(repo, remote))
    except Exception as exc:  # the remote that refused the push may refuse the listing too: DVC's error says why
        log.debug("could not list the remote after the failed push: %s", exc)
        return []
