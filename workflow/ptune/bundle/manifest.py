"""A deploy bundle's format: bundle.json, the one file that says what the bundle is, read and written here only.

models/deploy/
  bundle.json    the base model's record (bundle/origin.py: its hub repository and commit, or git URL and commit, or
                 a local path where that is all there is; its backend, config hash and each weight file's sha256),
                 how to load it (quantization), the prompt format the prefix was trained on (prompts.PromptFormat: the
                 templates or the chat template's text), generation settings
  prefix/        the trained prefix (prefix.safetensors + prefix_config.json), copied from models/ptuning
  README.md      the model card (bundle/card.py)

Nothing here imports torch: reading and checking a bundle (and the refusals, and `ptune publish`) needs none.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PtuneError
from ..model import trust
from ..state import atomic

MANIFEST = "bundle.json"
# 2: the prompt format (templates or chat template) replaced format 1's prompt_template, which served multi-turn
# conversations in another format than training's.
# 3: the base named by its origin (hub repository and commit, git URL and commit) and its weights' sha256, replacing
# format 2's local path `base_model`, which a bundle copied to another machine could not find.
FORMAT_VERSION = 3


def write(folder: Path, fields: dict) -> None:
    """bundle.json in `folder` (a bundle being built), stamped with this format's version."""
    atomic.write_json(folder / MANIFEST, {"format": FORMAT_VERSION, **fields})


def read_manifest(directory: str | Path) -> dict:
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        raise PtuneError(f"{manifest_path}: missing; build the bundle with `dvc repro deploy` (or `ptune deploy`)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    found = manifest.get("format")
    if found == 1:
        raise PtuneError(
            f"{manifest_path}: bundle format 1, written before ptune recorded the prompt format a prefix "
            "was trained on (its multi-turn prompts differed from training's); rebuild it with "
            "`dvc repro deploy` (or `ptune deploy`)"
        )
    if found == 2:
        raise PtuneError(
            f"{manifest_path}: bundle format 2, written before ptune recorded where a bundle's base model comes "
            "from (it named the local path models/base, which another machine does not have, and did not check the "
            "base's weights); rebuild it with `dvc repro deploy` (or `ptune deploy`)"
        )
    if found != FORMAT_VERSION:
        raise PtuneError(
            f"{manifest_path}: bundle format {found!r}, this ptune reads {FORMAT_VERSION}; rebuild it "
            "with `dvc repro deploy` (or `ptune deploy`)"
        )
    return manifest


def prefix_folder(directory: str | Path, manifest: dict) -> Path:
    """The bundle's own prefix folder, as bundle.json's `prefix` names it: a plain folder name inside the bundle (deploy
    writes "prefix"), a real folder, not a link. bundle.json is the word of whoever made the bundle: `..`, `.` or a
    link would have serving load, and `ptune publish` upload, files from anywhere on this machine."""
    name = manifest.get("prefix")
    folder = Path(directory) / str(name)
    if not trust.is_plain_name(name) or folder.is_symlink() or not folder.is_dir():
        raise PtuneError(
            f"{Path(directory) / MANIFEST}: prefix {name!r} is not the name of a folder inside the bundle (deploy "
            'writes "prefix", a folder, not a link); rebuild the bundle with `dvc repro deploy` (or `ptune deploy`)'
        )
    return folder
