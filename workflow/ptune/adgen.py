"""ADGEN files: JSON lines `{"content": "类型#上衣*...", "summary": "..."}`, read with errors that name the line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .errors import PtuneError

SPLITS = ("train", "dev")


def read(path: str | Path) -> list[dict[str, str]]:
    """Read one split; a bad line fails with its file and line number and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise PtuneError(f"{path}: no such file; an ADGEN directory holds train.json and dev.json")
    examples = []
    # utf-8-sig: files saved on Windows may start with a BOM; CRLF endings are handled by splitlines().
    with open(path, encoding="utf-8-sig", errors="strict") as fh:
        try:
            lines = fh.read().splitlines()
        except UnicodeDecodeError as exc:
            raise PtuneError(f"{path}: not UTF-8 (byte {exc.start}); re-encode it as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PtuneError(f"{path}:{number}: not a JSON object ({exc.msg} at column {exc.colno}); "
                             "each line must be {\"content\": ..., \"summary\": ...}") from None
        if not isinstance(obj, dict):
            raise PtuneError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        for key in ("content", "summary"):
            if not isinstance(obj.get(key), str):
                found = "missing" if key not in obj else f"a {type(obj[key]).__name__}"
                raise PtuneError(f"{path}:{number}: key {key!r} is {found}; it must be a string")
        examples.append({"content": obj["content"], "summary": obj["summary"]})
    if not examples:
        raise PtuneError(f"{path}: holds no examples")
    return examples


def write(path: str | Path, examples: Iterable[dict[str, str]]) -> None:
    """Write JSON lines as ADGEN does (UTF-8, not ASCII-escaped), atomically."""
    from . import atomic

    with atomic.atomic_file(path) as fh:
        for ex in examples:
            fh.write(json.dumps({"content": ex["content"], "summary": ex["summary"]}, ensure_ascii=False) + "\n")
