"""`ptune preset use NAME`: copy presets/NAME.yaml over params.yaml, so DVC and Snakemake see what changed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from . import config
from .errors import PtuneError

PRESETS_DIR = Path("presets")
PARAMS = Path("params.yaml")


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))}


def summary(path: Path) -> str:
    """The preset's first header comment line: what it is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _uncommitted(path: Path) -> str | None:
    """git's word on `path`: None when it is committed as is, else why it is not safe to overwrite."""
    proc = subprocess.run(["git", "status", "--porcelain", "--", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"git cannot tell whether it has uncommitted edits ({proc.stderr.strip() or 'not a git repository'})"
    return "it has uncommitted edits" if proc.stdout.strip() else None


def use(name: str, force: bool = False) -> Path:
    """Validate presets/NAME.yaml and copy it over params.yaml; refuses to overwrite uncommitted edits."""
    presets = available()
    if name not in presets:
        raise PtuneError(f"no preset {name!r} in {PRESETS_DIR}/; available: {', '.join(presets) or 'none'}")
    source = presets[name]
    config.load(source)  # a broken preset must not replace a working params.yaml
    if PARAMS.exists() and not force and (why := _uncommitted(PARAMS)):
        raise PtuneError(
            f"{PARAMS}: not replaced, {why}; commit them (`git commit params.yaml`), or discard "
            f"them (`git checkout params.yaml`), or pass --force to overwrite"
        )
    shutil.copyfile(source, PARAMS)
    return source
