"""data/raw files: ADGEN's JSON lines `{"content": "类型#上衣*...", "summary": "..."}`, plus `"history"` (earlier
[question, answer] turns) for data with a history column and `"system"` for examples with a system message. Read
with errors that name the line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import PtuneError
from ..state import atomic
from . import readers

RAW_COLUMNS = readers.Columns("content", "summary", "history", "system", history_per_row=True)


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
