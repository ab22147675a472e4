"""data/raw files: ADGEN's JSON lines `{"content": "类型#上衣*...", "summary": "..."}`, plus `"history"` (earlier
[question, answer] turns) for data with a history column and `"system"` for examples with a system message. Read
with errors that name the line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PtuneError
from ..state import atomic
from . import readers

RAW_COLUMNS = readers.Columns("content", "summary", "history", "system", history_per_row=True)


@dataclass(frozen=True)
class Expected:
    """What data/raw holds when it holds a given data set: examples per split, and dev.json's sha256."""

    train_examples: int
    dev_examples: int
    dev_sha256: str


# The original ADGEN, as the ChatGLM-6B tutorial distributes it (AdvertiseGen.tar.gz): train.json has 114,599 lines,
# dev.json 1,070. `write` writes the original dev.json back byte for byte (one JSON object a line, ", " and ": ",
# not ASCII-escaped), so data/raw/dev.json has the original's sha256 whatever format a copy came in.
ORIGINAL = Expected(114_599, 1_070, "96b63cfd9fd0faca122a5747597f46ff835f19d9b1d3634f4b71f8a5f9487cc1")
# The hubs' copies of it, as LLaMA-Factory registers them (its data/dataset_info.json: adgen_train, adgen_eval).
HUB_IDS = {"hf_hub": "HasturOfficial/adgen", "modelscope": "AI-ModelScope/adgen"}


def check(folder: Path, what: str, expected: Expected = ORIGINAL) -> None:
    """Stop, naming the split and the figure, when `folder`'s train.json and dev.json are not `expected`."""
    dev = (folder / "dev.json").read_bytes()
    figures = (
        ("dev", dev.count(b"\n"), expected.dev_examples),
        ("train", (folder / "train.json").read_bytes().count(b"\n"), expected.train_examples),
    )
    todo = (
        "pin a revision that holds the original, set fetch_data.expect: none to take these data as they are, or "
        "fetch the original archive (fetch_data.source: url)"
    )
    for split, found, want in figures:
        if found != want:
            raise PtuneError(
                f"{what}: the {split} split has {found:,} examples where the original ADGEN's {split}.json has "
                f"{want:,}: this is not the original data set, or not all of it; {todo}"
            )
        if split == "dev" and (digest := hashlib.sha256(dev).hexdigest()) != expected.dev_sha256:
            raise PtuneError(
                f"{what}: data/raw/dev.json written from it has sha256 {digest}, not {expected.dev_sha256} (the "
                f"original ADGEN dev.json's): its {found:,} examples differ from the original's in text or order; "
                f"{todo}"
            )


def read(path: str | Path) -> list[readers.Example]:
    """Read one split; a bad line fails with its file and line number and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise PtuneError(f"{path}: no such file; an ADGEN directory holds train.json and dev.json")
    return readers.read(path, RAW_COLUMNS)


def write(path: str | Path, examples: Iterable[readers.Example]) -> None:
    """Write JSON lines as ADGEN does (UTF-8, not ASCII-escaped), atomically."""
    with atomic.atomic_file(path) as fh:
        for ex in examples:
            row = {"content": ex["content"], "summary": ex["summary"]}
            if "history" in ex:  # even empty: see readers.Columns.history_per_row
                row["history"] = ex["history"]
            if ex.get("system"):
                row["system"] = ex["system"]
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
