"""`ptune doctor`: before a long run, check this machine against what params.yaml needs, each problem with
what to do. Disk where the model, the fetch's store and the DVC cache go; GPU and its memory; the stack's
versions; git-lfs; where the model and the data come from (a hub's package and cache, a folder, a checksum); the
DVC remote (reachable, and not on the disk that disappears with the instance), where its credentials come from and
that no key sits in a committed file; when this instance's disk is wiped; and, on request, a write/read/delete round
trip of an object through DVC's own filesystem for the remote (`--remote-roundtrip`; `--large`: over 100 MiB, the size
at which uploads go multipart and dvc-oss lost files, DVC #10643)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .config import Params
from .errors import PtuneError
from .remote import configure
from .remote.dvc_remote import remote_info

GIB = 1 << 30
# What `make setup` pins and a run's bytes depend on; torch is chosen per machine and not pinned.
PINNED = ("transformers", "tokenizers", "datasets", "huggingface_hub", "safetensors", "dvc", "snakemake")
CONSTRAINTS = Path("requirements/lock.txt")
OSS_HINT = (
    "`ptune remote oss --bucket BUCKET --region cn-hangzhou [--internal]` (Alibaba OSS; credentials from the "
    "instance's RAM role or the environment), or any storage DVC knows (`dvc remote add -d NAME URL`)"
)
NAS_HINT = "a NAS or OSS bucket mounted on the instance: `ptune remote nas /mnt/data/ptune-dvc-storage`"
LARGE = 101 << 20  # over 100 MiB: uploads go multipart (s3fs: at 2 x its 50 MiB chunk), as DVC #10643's lost files
# Keys that botocore reads from an AWS config or credentials file: never in a committed one.
AWS_KEYS = re.compile(r"^\s*(aws_access_key_id|aws_secret_access_key|aws_session_token)\s*=\s*\S", re.M)
DSW_ENV = "DSW_INSTANCE_ID"  # set in every PAI-DSW instance (Alibaba's PAI SDK finds the instance by it)


@dataclass(frozen=True)
class Finding:
    topic: str
    ok: bool
    text: str
    todo: str = ""


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing ancestor: where something not yet created will go."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _device_of(path: Path) -> int:
    return _existing(path).stat().st_dev


def _versions() -> list[Finding]:
    pins = {}
    if CONSTRAINTS.is_file():
        for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
            if m := re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line):
                pins[m.group(1).lower().replace("-", "_")] = m.group(2)
    found, off = [f"python {platform.python_version()}"], []
    try:
        import torch

        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        found.append(f"torch {torch.__version__} ({cuda})")
    except ImportError:
        off.append("torch is not installed")
    for name in PINNED:
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            off.append(f"{name} is not installed")
            continue
        found.append(f"{name} {have}")
        want = pins.get(name.lower().replace("-", "_"))
        if want and want != have:
            off.append(f"{name} {have}, pinned {want}")
    if off:
        return [Finding("stack", False, "; ".join(off), "recreate the environment: `make clean-venv setup`")]
    return [Finding("stack", True, ", ".join(found))]


def _git_lfs(params: Params) -> list[Finding]:
    needed = params.fetch_weights.source == "git_lfs"
    path = shutil.which("git-lfs")
    if path:
        version = subprocess.run(["git-lfs", "version"], capture_output=True, text=True).stdout.strip()
        return [Finding("git-lfs", True, version or path)]
    todo = "`apt-get install git-lfs` (or `conda install -c conda-forge git-lfs`), then `git lfs install`"
    if needed:
        return [Finding("git-lfs", False, "not installed, and fetch_weights.source is git_lfs", todo)]
    return [Finding("git-lfs", True, f"not installed (not needed by this params file; {todo} for git_lfs)")]


def _hub_source(topic: str, section: str, source: str, repo: str, revision: str, repo_type: str) -> Finding:
    """A hub source, checked without asking the hub: its package, and whether the cache holds the revision."""
    from .sources import hub

    kind = "Hugging Face hub" if source == "hf_hub" else "ModelScope"
    offline = source == "hf_hub" and hub.hf_offline()
    try:
        folder = hub.cached(source, repo, revision, repo_type)
    except PtuneError as exc:
        return Finding(topic, False, f"{section}.source {source}: {exc}", "`pip install -e '.[modelscope]'`")
    pin = "" if re.fullmatch(r"[0-9a-f]{40}", revision) else f"; {revision!r} is a branch or tag, not a commit: pin one"
    what = f"{repo}@{revision} ({kind} {hub.noun(repo_type)})"
    if folder is not None:
        return Finding(topic, True, f"{what}: in the hub's cache ({folder}), so a run also works offline{pin}")
    if offline:
        return Finding(
            topic,
            False,
            f"{what}: not in the hub's cache, and HF_HUB_OFFLINE is set: the run cannot fetch it",
            "unset HF_HUB_OFFLINE where the hub (or a mirror, HF_ENDPOINT) can be reached",
        )
    return Finding(
        topic, True, f"{what}: not in the hub's cache yet; the run downloads it from {hub.endpoint(source)}{pin}"
    )


def _sources(params: Params) -> list[Finding]:
    """Where the base model and the data come from, each checked the same way, without the network."""
    w, d = params.fetch_weights, params.fetch_data
    out = []
    if w.source in ("hf_hub", "modelscope"):
        out.append(_hub_source("weights", "fetch_weights", w.source, w.repo, w.revision, "model"))
    if d.source in ("hf_hub", "modelscope"):
        out.append(_hub_source("data", "fetch_data", d.source, d.repo, d.revision, "dataset"))
    elif d.source == "path":
        folder = Path(d.path).expanduser()
        missing = [name for name in (d.train_file, d.dev_file) if not (folder / name).is_file()]
        if missing:
            out.append(
                Finding(
                    "data",
                    False,
                    f"fetch_data.path {folder} holds no {', '.join(missing)}",
                    "point fetch_data.path at the folder that holds them, or name them in fetch_data.train_file / "
                    "dev_file",
                )
            )
        else:
            out.append(Finding("data", True, f"{folder}: {d.train_file} and {d.dev_file}"))
    elif d.source == "url" and not d.sha256:
        out.append(
            Finding(
                "data",
                False,
                f"fetch_data.url {d.url} has no sha256: the first run downloads it, stops and prints its sha256",
                "set fetch_data.sha256 once you have checked it; or fetch ADGEN pinned by a hub revision in one step "
                "(fetch_data.source: hf_hub, repo: HasturOfficial/adgen, docs/pipeline.md)",
            )
        )
    elif d.source == "url":
        out.append(Finding("data", True, f"{d.url} (sha256 {d.sha256[:12]}...)"))
    else:
        out.append(Finding("data", True, "embedded: generated here, nothing to fetch"))
    return out


def _gpu(params: Params) -> list[Finding]:
    need = params.hardware.gpu_memory_gib
    try:
        import torch
    except ImportError:
        return [Finding("gpu", False, "torch is not installed", "run `make setup`")]
    if not torch.cuda.is_available():
        if need > 0:
            return [
                Finding(
                    "gpu",
                    False,
                    f"no CUDA GPU visible, and this run needs {need:g} GiB of GPU memory (hardware.gpu_memory_gib)",
                    "run on a GPU instance (check `nvidia-smi`); a CPU build of torch cannot use one: "
                    "`make clean-venv setup` keeps or installs a CUDA build",
                )
            ]
        return [Finding("gpu", True, "none; this run needs none")]
    props = torch.cuda.get_device_properties(0)
    have = props.total_memory / GIB
    out = []
    text = f"{props.name}, {have:.1f} GiB; this run needs {need:g} GiB"
    if have + 0.5 < need:  # cards are sold as "16 GB" and report a little less
        out.append(Finding("gpu", False, text, "use a larger GPU, or a preset for this card (`ptune preset use`)"))
    else:
        out.append(Finding("gpu", True, text))
    if params.train.precision == "bf16" and not torch.cuda.is_bf16_supported():
        out.append(
            Finding(
                "gpu",
                False,
                f"{props.name} has no bf16, and train.precision is bf16",
                "set train.precision: fp16 (loss scaling) or fp32",
            )
        )
    return out


def _dvc_repo():
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(".")
    except NotDvcRepoError:
        raise PtuneError(
            f"{Path.cwd()} is not the project root (no .dvc/ here); run `ptune doctor` where "
            "params.yaml and dvc.yaml are"
        ) from None


def _disk(params: Params, repo) -> list[Finding]:
    model = params.hardware.model_gib
    cfg = params.fetch_weights
    base = paths.BASE
    # (where, what, GiB, when): "fetch" lives only while fetch_weights runs, "kept" stays; the peak counts.
    needs: list[tuple[Path, str, float, str]] = []
    hub_cache = None
    if cfg.source == "hf_hub":
        from huggingface_hub import constants

        hub_cache = Path(constants.HF_HUB_CACHE)
    elif cfg.source == "modelscope":
        hub_cache = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope"))
    if hub_cache is not None:
        needs.append((hub_cache, "the hub cache", model, "kept"))
        if _device_of(hub_cache) == _device_of(base):
            needs.append((base, "models/base (hard links into the hub cache)", 0.0, "kept"))
        else:
            needs.append((base, "models/base", model, "kept"))
    else:
        needs.append((base, "models/base", model, "kept"))
    if cfg.source == "git_lfs":
        needs.append((Path(".ptune/state"), "the Git LFS store while fetching", model, "fetch"))
    cache_type = str(repo.config["cache"].get("type") or "reflink,copy")
    if not any(t in cache_type for t in ("hardlink", "symlink")):
        # DVC copies an output into its cache after the stage, when the fetch's own store is gone.
        needs.append((Path(repo.cache.local.path), f"the DVC cache (cache.type {cache_type}: a copy)", model, "after"))
    needs.append((Path("."), "data, checkpoints and reports", 2.0, "kept"))
    by_fs: dict[int, list[tuple[Path, str, float, str]]] = {}
    for entry in needs:
        by_fs.setdefault(_device_of(entry[0]), []).append(entry)
    out = []
    for entries in by_fs.values():
        where = _existing(entries[0][0])
        free = shutil.disk_usage(where).free / GIB
        kept = sum(g for *_, g, when in entries if when == "kept")
        need = kept + max(sum(g for *_, g, when in entries if when == phase) for phase in ("fetch", "after"))
        parts = ", ".join(f"{w} {g:g}" for _, w, g, _ in entries)
        text = f"{where}: {free:.1f} GiB free, the run needs about {need:g} GiB at its peak there ({parts})"
        if free < need:
            out.append(
                Finding(
                    "disk",
                    False,
                    text,
                    "free space, or move the big stores to a larger disk: `dvc cache dir PATH` for the "
                    "DVC cache, HF_HOME for the Hugging Face cache; `dvc config cache.type "
                    "hardlink,symlink` keeps one copy instead of two",
                )
            )
        else:
            out.append(Finding("disk", True, text))
    return out


def _remote(repo) -> list[Finding]:
    try:
        remote = repo.cloud.get_remote()
    except Exception as exc:  # dvc raises NoRemoteError and config errors alike
        return [
            Finding(
                "dvc remote",
                False,
                f"none usable ({exc})".replace("\n", " "),
                f"`dvc push` has nowhere to go: {OSS_HINT}; or {NAS_HINT}",
            )
        ]
    url = f"{remote.fs.protocol}://{remote.path}" if remote.fs.protocol != "local" else remote.path
    try:
        reachable = remote.fs.exists(remote.path)
    except Exception as exc:  # network, credentials: whatever the filesystem raises
        return [
            Finding(
                "dvc remote",
                False,
                f"{remote.name} ({url}) cannot be reached: {exc}".replace("\n", " "),
                "check its URL, endpoint and credentials: `dvc remote list`, `dvc remote modify`",
            )
        ]
    if remote.fs.protocol != "local":
        return [Finding("dvc remote", True, f"{remote.name} ({url}) reachable")]
    path = Path(remote.path)
    if not reachable and not os.access(_existing(path), os.W_OK):
        return [
            Finding(
                "dvc remote",
                False,
                f"{remote.name} ({path}) does not exist and cannot be created",
                f"point the remote at storage you can write and that survives the instance: {OSS_HINT}",
            )
        ]
    info = remote_info(repo)  # the one check of whether a directory outlives the instance (ptune status uses it)
    if info.same_disk:
        return [
            Finding(
                "dvc remote",
                False,
                f"{remote.name} ({path}) is on the same disk as the workspace: it disappears with the "
                "instance, and `dvc push` saves nothing that survives it",
                f"use storage outside the instance: {OSS_HINT}; or {NAS_HINT}",
            )
        ]
    return [Finding("dvc remote", True, f"{remote.name} ({path}) on its own filesystem ({info.mount_point})")]


def _committed_secrets(repo) -> list[Finding]:
    """Keys in the files git carries to every clone: .dvc/config, and the AWS config files remotes name."""
    found = []
    conf = repo.config.load_one("repo")
    for name, options in conf.get("remote", {}).items():
        keys = [key for key in configure.SECRET_OPTIONS if options.get(key)]
        if keys:
            moves = "; ".join(f"`dvc remote modify --local {name} {key} VALUE`" for key in keys)
            unsets = " ".join(f"`dvc remote modify --unset {name} {key}`" for key in keys)
            found.append(
                Finding(
                    "secrets",
                    False,
                    f".dvc/config (committed, in every clone) holds {', '.join(keys)} of remote '{name}'",
                    f"move them to the uncommitted .dvc/config.local: {moves}, then {unsets}; or drop them and let "
                    "the instance's RAM role provide temporary ones (`ptune remote oss`, docs/surviving.md). Once "
                    "committed, a key stays in git history: disable it and make a new one (RAM console)",
                )
            )
        configpath = options.get("configpath")  # DVC made it absolute
        if configpath and Path(configpath).is_file() and _inside_project(Path(configpath)):
            text = Path(configpath).read_text(encoding="utf-8", errors="replace")
            configpath = os.path.relpath(configpath)
            keys = sorted(set(AWS_KEYS.findall(text)))
            if keys:
                found.append(
                    Finding(
                        "secrets",
                        False,
                        f"{configpath} (remote '{name}''s AWS config, committed) holds {', '.join(keys)}",
                        "delete those lines: keys go in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), "
                        f"in .dvc/config.local (`dvc remote modify --local {name} access_key_id ...`), or come from "
                        "the RAM role (its credential_process); a committed key stays in git history: disable it",
                    )
                )
    return found or [Finding("secrets", True, "no key in .dvc/config or in the AWS config a remote names")]


def _inside_project(path: Path) -> bool:
    return path.resolve().is_relative_to(Path(".").resolve())


def _credentials(repo, env_config: str | None) -> list[Finding]:
    """For an S3/OSS remote that names an AWS config: that its settings are used, and where its keys come from.
    `env_config`: AWS_CONFIG_FILE as the user set it (dvc-s3 sets it in this process once it opens the remote)."""
    name = repo.config["core"].get("remote")
    options = repo.config["remote"].get(name, {}) if name else {}
    if not str(options.get("url", "")).startswith("s3://") or not options.get("configpath"):
        return []
    configpath = os.path.relpath(options["configpath"])  # DVC made it absolute
    out = []
    if env_config and Path(env_config).resolve() != Path(configpath).resolve():
        out.append(
            Finding(
                "credentials",
                False,
                f"AWS_CONFIG_FILE={env_config} is set, so DVC does not use remote '{name}''s configpath "
                f"{configpath} (dvc-s3 sets AWS_CONFIG_FILE only when it is unset): OSS's settings are lost",
                "unset AWS_CONFIG_FILE",
            )
        )
    if Path(configpath).is_file():
        process = re.search(r"^\s*credential_process\s*=\s*(.+)$", Path(configpath).read_text(encoding="utf-8"), re.M)
        command = shlex.split(process.group(1))[0] if process else None
        if command and not shutil.which(command):
            out.append(
                Finding(
                    "credentials",
                    False,
                    f"{configpath} names the credential helper `{process.group(1).strip()}`, and `{command}` is not "
                    "on PATH: botocore cannot run it",
                    "activate the project's environment: `source .venv/bin/activate`",
                )
            )
    found, how = configure.credential_source(name)
    out.append(
        Finding(
            "credentials",
            found,
            f"remote '{name}': {how}",
            "" if found else "attach a RAM role to the instance, or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )
    )
    return out


def _instance_disk(repo) -> list[Finding]:
    """When this machine's disk goes: PAI-DSW's rules where this is a DSW instance; a general note otherwise, while
    the remote is on that disk."""
    rules = (
        "PAI-DSW wipes an instance's disk when the instance is deleted; in a public resource group also after it "
        "has been stopped for 15 days, in a dedicated resource group at every stop"
    )
    instance = os.environ.get(DSW_ENV)
    if instance:
        return [Finding("instance disk", True, f"PAI-DSW instance {instance}: {rules}. `ptune push` before stopping")]
    try:
        info = remote_info(repo)
    except PtuneError:
        return []
    if info.name is None or info.same_disk:
        return [
            Finding(
                "instance disk",
                True,
                f"a cloud notebook's disk goes with its instance ({rules}); the remote is on this disk, so nothing "
                "pushed would outlive it",
            )
        ]
    return []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _roundtrip(repo, size: int) -> list[Finding]:
    """Write, stat, read back and delete one object of `size` random bytes through DVC's filesystem for the default
    remote: the calls `dvc push` and `dvc pull` make, with the remote's own config and credentials."""
    topic = "remote round trip"
    try:
        remote = repo.cloud.get_remote()
    except Exception as exc:
        return [Finding(topic, False, f"no remote to try ({exc})".replace("\n", " "), OSS_HINT)]
    fs = remote.fs
    target = fs.join(remote.path, "ptune-doctor", f"{uuid.uuid4().hex}.bin")
    shown = f"{remote.fs.protocol}://{target}" if remote.fs.protocol != "local" else target
    what = f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size} bytes"
    step, written = "write", False
    with tempfile.TemporaryDirectory(prefix="ptune-doctor-") as tmp:
        sent, back = Path(tmp) / "sent.bin", Path(tmp) / "back.bin"
        with open(sent, "wb") as fh:
            for start in range(0, size, 8 << 20):
                fh.write(os.urandom(min(8 << 20, size - start)))
        began = time.monotonic()
        try:
            written = True  # from the first byte sent, there may be something to delete
            fs.put_file(str(sent), target, size=size)
            step = "find"
            stored = fs.info(target).get("size")
            if stored != size:
                raise PtuneError(f"the remote holds {stored} bytes of the {size} written")
            step = "read back"
            fs.get_file(target, str(back))
            if back.stat().st_size != size or _sha256(back) != _sha256(sent):
                raise PtuneError("the bytes read back differ from those written")
            step = "delete"
            fs.rm_file(target)
            written = False
            if fs.exists(target):
                raise PtuneError("it is still there after the delete")
        except Exception as exc:
            return [
                Finding(
                    topic,
                    False,
                    f"{what}: could not {step} {shown}: {exc}".replace("\n", " "),
                    "check the remote's endpoint, bucket and permissions (read, write and delete): `dvc remote "
                    "list`; docs/surviving.md",
                )
            ]
        finally:
            if written:
                try:
                    fs.rm_file(target)
                except Exception:  # the finding above says what failed; a leftover under ptune-doctor/ is harmless
                    pass
            if remote.fs.protocol == "local":
                try:
                    Path(target).parent.rmdir()  # only if empty: another doctor may be running
                except OSError:
                    pass
    seconds = time.monotonic() - began
    return [
        Finding(
            topic,
            True,
            f"{what} written, found, read back byte for byte and deleted on {remote.name} in {seconds:.1f} s",
        )
    ]


def check(params: Params, roundtrip: bool = False, large: bool = False) -> list[Finding]:
    env_config = os.environ.get("AWS_CONFIG_FILE")
    repo = _dvc_repo()
    try:
        findings = [
            *_disk(params, repo),
            *_gpu(params),
            *_versions(),
            *_git_lfs(params),
            *_sources(params),
            *_remote(repo),
            *_committed_secrets(repo),
            *_credentials(repo, env_config),
            *_instance_disk(repo),
        ]
        if roundtrip or large:
            findings += _roundtrip(repo, 4096)
        if large:
            findings += _roundtrip(repo, LARGE)
        return findings
    finally:
        repo.close()


def render(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{'ok' if f.ok else 'PROBLEM':8} {f.topic}: {f.text}")
        if f.todo:
            lines.append(f"{'':8}   what to do: {f.todo}")
    problems = sum(not f.ok for f in findings)
    lines.append(f"{problems} problem(s)" if problems else "no problems found")
    return "\n".join(lines)
