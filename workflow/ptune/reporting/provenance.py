"""Where a run's results come from: the code's git commit, package versions, the base model, the data's hashes."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from ..paths import SOURCE_RECORD  # what fetch_weights records next to the model it puts in models/base

# The packages whose versions change what a run computes or how it runs.
PACKAGES = (
    "ptune",
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "safetensors",
    "jieba",
    "rouge-chinese",
    "nltk",
    "numpy",
    "dvc",
    "snakemake",
)


def git_commit(root: Path = Path(".")) -> dict:
    """HEAD's commit (None outside a git checkout) and the tracked files that differ from it, leaving out
    what the pipeline itself rewrites (dvc.lock, the .gitignore files DVC keeps)."""

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "changed": []}
    status = (
        git(
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)dvc.lock",
            ":(exclude,glob)**/.gitignore",
        )
        or ""
    )
    return {"commit": commit.strip(), "changed": [line[3:] for line in status.splitlines() if line.strip()]}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions  # torch's version names its build: 2.13.0+cpu, 2.11.0+cu130


def base_model(directory: Path) -> dict:
    """What fetch_weights recorded about the base model (source, and id, revision or path where it has them),
    with the architecture from its config.json."""
    facts: dict = {}
    record = directory / SOURCE_RECORD
    if record.is_file():
        facts.update(json.loads(record.read_text(encoding="utf-8")))
    config = directory / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text(encoding="utf-8"))
        facts["model_type"] = cfg.get("model_type")
        facts["architectures"] = ", ".join(cfg.get("architectures") or [])
    return facts


def sha256_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (relative path -> hex digest), read in 1 MiB blocks."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digests[str(path)] = h.hexdigest()
    return digests
