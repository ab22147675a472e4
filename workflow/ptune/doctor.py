"""`ptune doctor`: before a long run, check this machine against what params.yaml needs, each problem with
what to do. Disk where the model, the fetch's store and the DVC cache go; GPU and its memory; the stack's
versions; git-lfs; where the model and the data come from (a hub's package and cache, a folder, a checksum); the
DVC remote (reachable, and not on the disk that disappears with the instance)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .config import Params
from .errors import PtuneError

GIB = 1 << 30
# What `make setup` pins and a run's bytes depend on; torch is chosen per machine and not pinned.
PINNED = ("transformers", "tokenizers", "datasets", "huggingface_hub", "safetensors", "dvc", "snakemake")
CONSTRAINTS = Path("requirements/lock.txt")
OSS_HINT = (
    "`dvc remote add -d -f oss s3://BUCKET/ptune` and `dvc remote modify oss endpointurl "
    "https://oss-cn-REGION.aliyuncs.com` (credentials: `dvc remote modify --local oss access_key_id ...`)"
)


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
                f"`dvc push` has nowhere to go: {OSS_HINT}",
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
                f"{remote.name} ({url}) cannot be reached: {exc}",
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
    if _device_of(path) in (_device_of(Path("/")), _device_of(Path("."))):
        return [
            Finding(
                "dvc remote",
                False,
                f"{remote.name} ({path}) is on the same disk as the workspace: it disappears with the "
                "instance, and `dvc push` saves nothing that survives it",
                f"use storage outside the instance: {OSS_HINT}; or a mounted NAS/OSS path "
                "(`dvc remote add -d -f nas /mnt/data/ptune-dvc-storage`)",
            )
        ]
    return [Finding("dvc remote", True, f"{remote.name} ({path}) on its own filesystem")]


def check(params: Params) -> list[Finding]:
    repo = _dvc_repo()
    try:
        return [
            *_disk(params, repo),
            *_gpu(params),
            *_versions(),
            *_git_lfs(params),
            *_sources(params),
            *_remote(repo),
        ]
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
