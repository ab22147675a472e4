"""Source `git_lfs`: clone a model repository at a pinned revision, then download its LFS files, resumably.

The clone skips LFS content (GIT_LFS_SKIP_SMUDGE=1) so that `git clone` never hangs inside a smudge filter
without progress; `git lfs pull` then downloads, retried with backoff. Every LFS file is checked against its
pointer (sha256 and size) afterwards, because a `git lfs pull` killed mid-way leaves a stale .git/index.lock and
a truncated working-tree file that a rerun of `git lfs pull` does not repair and `git lfs fsck` calls OK; a
corrupt object in the local store is copied out just as silently. Both are repaired here: the bad file (and
its local object) is removed, and the next pull fetches it again.

Values from params.yaml reach git's command line, so none of them may stand where git reads options: the
revision must be a commit hash or a valid ref name (revision_problem), every command that takes one is given
`--end-of-options` before it, and checkout is given a hash git itself resolved. The repository URL may use only
the transports in ALLOWED_PROTOCOLS (not `ext::`, which runs a command). A checked-out tree with a symbolic link
in it is refused (refuse_links): the weights folder is moved into models/base, read, pushed and served.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from ..errors import PtuneError
from ..guards import revision_problem
from .lfs_pointer import Pointer, content_problem, read_pointer

log = logging.getLogger(__name__)

# Transports git may use for fetch_weights.repo (GIT_ALLOW_PROTOCOL): `ext::` and other remote helpers are left out.
ALLOWED_PROTOCOLS = "https:http:ssh:git:file"
_HASH = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a full SHA-1 or SHA-256 object name, as rev-parse prints it


def _git(clone: Path | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["git", *(["-C", str(clone)] if clone else []), *args]
    # Skip the smudge filter everywhere: content comes only from `git lfs pull`, which we can retry and verify.
    env = {
        **os.environ,
        "GIT_LFS_SKIP_SMUDGE": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ALLOW_PROTOCOL": ALLOWED_PROTOCOLS,
    }
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise PtuneError("git is not installed; install it (`apt-get install git git-lfs`)") from None
    if check and proc.returncode != 0:
        raise PtuneError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    return proc


def _tail(text: str, lines: int = 4) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(no message)"


def require_git_lfs() -> None:
    if shutil.which("git-lfs") is None:
        raise PtuneError(
            "git-lfs is not installed, and the git_lfs source needs it: `apt-get install git-lfs` "
            "(Debian/Ubuntu) or `conda install -c conda-forge git-lfs`"
        )


def lfs_files(clone: Path) -> dict[str, Pointer]:
    """The LFS files of the checked-out revision, from git's own record of their pointers."""
    proc = _git(clone, "lfs", "ls-files", "--json")
    files = json.loads(proc.stdout or "{}").get("files") or []
    return {f["name"]: Pointer(f["oid"], int(f["size"])) for f in files}


def _clone(repo: str, clone: Path, attempts: int, backoff_s: float) -> None:
    partial = clone.with_name(clone.name + ".partial")
    for attempt in range(attempts):
        shutil.rmtree(partial, ignore_errors=True)  # a clone cut short cannot be resumed; it is small anyway
        proc = _git(None, "clone", "--no-checkout", "--end-of-options", repo, str(partial), check=False)
        if proc.returncode == 0:
            os.replace(partial, clone)
            return
        log.warning("git clone %s failed (attempt %d of %d): %s", repo, attempt + 1, attempts, _tail(proc.stderr))
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    shutil.rmtree(partial, ignore_errors=True)
    raise PtuneError(
        f"fetch_weights.repo: `git clone {repo}` failed {attempts} times: {_tail(proc.stderr)}; "
        "check the URL and your network (a mirror can be used by giving its URL)"
    )


def _resolve(clone: Path, name: str) -> subprocess.CompletedProcess:
    """The commit `name` stands for in the clone (rev-parse: its stdout, exit 0), whatever `name` holds."""
    return _git(clone, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}", check=False)


def _fetch_revision(clone: Path, revision: str) -> None:
    """Fetch every branch and tag, then `revision` itself (a commit no branch points at); whatever `revision`
    holds, git reads it as a refspec, never as an option such as --upload-pack=COMMAND."""
    _git(clone, "fetch", "--quiet", "origin", check=False)
    _git(clone, "fetch", "--quiet", "--end-of-options", "origin", revision, check=False)


def _checkout(clone: Path, revision: str) -> str:
    """Check out `revision` (fetching it if the clone lacks it); returns its commit."""
    why = revision_problem(revision)
    if why:  # params loading refuses it first; this keeps the function safe on its own
        raise PtuneError(f"fetch_weights.revision: {revision!r} is not a commit hash or a valid ref name ({why})")
    have = _resolve(clone, revision)
    if have.returncode != 0:
        _fetch_revision(clone, revision)
        have = _resolve(clone, revision)
        if have.returncode != 0:
            have = _resolve(clone, f"origin/{revision}")
        if have.returncode != 0:
            raise PtuneError(
                f"fetch_weights.revision: {revision!r} is not a commit, branch or tag of "
                f"{_git(clone, 'remote', 'get-url', 'origin').stdout.strip()}"
            )
    commit = have.stdout.strip()
    if not _HASH.fullmatch(commit):
        raise PtuneError(f"fetch_weights.revision: git resolved {revision!r} to {commit!r}, not a commit hash")
    # Keeps the LFS filters out of the user's own git config.
    _git(clone, "lfs", "install", "--local", "--skip-smudge")
    # checkout takes no --end-of-options (git 2.39): it gets a hash git printed, and `--` ends what it reads.
    _git(clone, "-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit, "--")
    return commit


def refuse_links(folder: Path, what: str) -> None:
    """Refuse a checked-out tree (`.git` aside) with a symbolic link in it, naming the link. A model repository
    holds files; a link in it can point anywhere on this machine (an SSH key, a token file), and the tree becomes
    models/base, which later stages read, push to the DVC remote and bundle for serving."""
    for top, dirs, files in os.walk(folder):
        if Path(top) == folder and ".git" in dirs:
            dirs.remove(".git")
        for name in sorted(dirs + files):
            path = Path(top, name)
            if path.is_symlink():
                raise PtuneError(
                    f"{what}: {path.relative_to(folder)} is a symbolic link (to {os.readlink(path)!r}); a model "
                    "folder must hold regular files only, since a link can reach any file on this machine. Fetch "
                    "a revision without links, or copy the real files into a folder and use fetch_weights.source: "
                    "path"
                )


def _clear_stale_locks(clone: Path) -> None:
    """Undo what a killed git leaves in .git: only our own git runs in this clone, and we hold the fetch lock."""
    git_dir = clone / ".git"
    (git_dir / "index.lock").unlink(missing_ok=True)
    tmp = git_dir / "lfs" / "tmp"
    if tmp.is_dir():
        for part in tmp.rglob("*"):
            if part.is_file() and part.stat().st_size == 0:
                part.unlink()


def _remove_truncated(clone: Path, files: dict[str, Pointer]) -> None:
    """A file of the wrong size that is not a pointer is a download cut short: `git lfs pull` would keep it."""
    for name, pointer in files.items():
        path = clone / name
        if path.is_file() and read_pointer(path) is None and path.stat().st_size != pointer.size:
            log.info(
                "removing %s: %d bytes, expected %d (an interrupted download)", name, path.stat().st_size, pointer.size
            )
            path.unlink()


def _drop_bad(clone: Path, name: str, pointer: Pointer, why: str) -> None:
    """Remove a file that is neither a pointer nor its content, so that the next pull writes it anew; a corrupt
    one was copied from a corrupt object in the local LFS store, which goes too."""
    path = clone / name
    if not path.is_file() or read_pointer(path) is not None:
        return  # missing or still a pointer: the next pull fills it in
    log.warning("%s: %s; downloading it again", name, why)
    path.unlink()
    if why.endswith("(corrupt)"):
        obj = clone / ".git" / "lfs" / "objects" / pointer.oid[:2] / pointer.oid[2:4] / pointer.oid
        obj.unlink(missing_ok=True)


def fetch(repo: str, revision: str, workdir: Path, attempts: int = 5, backoff_s: float = 5.0) -> tuple[Path, str]:
    """Clone `repo` at `revision` into `workdir`/repo with every LFS file downloaded and verified.

    A rerun after an interruption reuses the clone and downloads only what is missing or wrong. Returns the
    clone and the commit checked out.
    """
    require_git_lfs()
    workdir.mkdir(parents=True, exist_ok=True)
    clone = workdir / "repo"
    if not (clone / ".git").is_dir():
        _clone(repo, clone, attempts, backoff_s)
    _clear_stale_locks(clone)
    commit = _checkout(clone, revision)
    refuse_links(clone, f"fetch_weights.repo {repo}@{commit[:12]}")  # before git-lfs writes into the tree
    files = lfs_files(clone)
    _remove_truncated(clone, files)
    pending = dict(files)  # hashing 13 GB takes a while: a file verified once is not hashed again
    problems: dict[str, str] = {}
    last_error = ""
    for attempt in range(attempts):
        proc = _git(clone, "lfs", "pull", check=False)
        if proc.returncode != 0:
            last_error = _tail(proc.stderr)
            log.warning("git lfs pull failed (attempt %d of %d): %s", attempt + 1, attempts, last_error)
            (clone / ".git" / "index.lock").unlink(missing_ok=True)
        problems = {name: why for name, p in pending.items() if (why := content_problem(clone / name, p))}
        pending = {name: files[name] for name in problems}
        if not problems:
            log.info("%d LFS file(s) of %s@%s downloaded and verified", len(files), repo, commit[:12])
            return clone, commit
        for name, why in problems.items():
            _drop_bad(clone, name, files[name], why)
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    listed = "\n".join(f"  {name}: {why}" for name, why in sorted(problems.items()))
    raise PtuneError(
        f"{repo}@{revision}: {len(problems)} LFS file(s) are not complete after {attempts} tries of "
        f"`git lfs pull`{f' (last error: {last_error})' if last_error else ''}:\n{listed}\n"
        f"Resume with `ptune fetch_weights` (or `dvc repro fetch_weights`): the clone in {clone} is kept and only "
        f"what is missing is downloaded. By hand: `git -C {clone} lfs pull`."
    )
