"""A data set's files as the user has them: JSON lines or CSV, columns by name, read with errors that say where.

Every example becomes `{"content", "summary"}`, plus `"history"` (earlier [question, answer] turns, maybe none) when
the data set has a history column and `"system"` when it has a system column and the example a system message: the
shape of data/raw, whatever the source. Duplicates are kept, as the reference keeps them.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PtuneError

Example = dict[str, Any]


@dataclass(frozen=True)
class Columns:
    prompt: str = "content"
    response: str = "summary"
    history: str = ""  # "" = the data has no history
    system: str = ""  # "" = the data has no system messages
    # data/raw: a row without the history key belongs to a data set without a history column. A source's rows
    # (False) all get one once a history column is named, empty where a row has none.
    history_per_row: bool = False


def decode(path: Path, encoding: str) -> str:
    """The file's text; a file in another encoding than `encoding` fails naming its line and how to convert it."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise PtuneError(
            f"fetch_data.encoding: {encoding!r} is not a known text encoding (use utf-8, gbk or gb18030)"
        ) from None
    data = path.read_bytes()
    try:
        # utf-8-sig: files saved by Windows editors often start with a BOM.
        return data.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        hint = f"re-save it as {encoding}"
        if codec == "utf-8":
            try:
                data.decode("gb18030")
                hint = (
                    "it reads as GBK/GB18030, as Chinese text re-saved on Windows often is: set "
                    f"fetch_data.encoding: gbk, or convert it with `iconv -f GB18030 -t UTF-8 {path} > "
                    f"{path.with_suffix('.utf8' + path.suffix)}`"
                )
            except UnicodeDecodeError:
                pass
        raise PtuneError(
            f"{path}:{line}: not {encoding} text (byte 0x{data[exc.start]:02x} at offset {exc.start}); {hint}"
        ) from None


def _history(value: Any, where: str, column: str) -> list[list[str]]:
    if value is None or value == []:
        return []
    ok = isinstance(value, list) and all(
        isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in value
    )
    if not ok:
        raise PtuneError(
            f"{where}: column {column!r} must be a list of [question, answer] string pairs, "
            f"got {json.dumps(value, ensure_ascii=False)[:80]}"
        )
    return [list(turn) for turn in value]


def _example(row: dict, where: str, cols: Columns) -> Example:
    out: Example = {}
    for key, column in (("content", cols.prompt), ("summary", cols.response)):
        value = row.get(column)
        if not isinstance(value, str):
            found = "missing" if column not in row else f"a {type(value).__name__}"
            raise PtuneError(f"{where}: key {column!r} is {found}; it must be a string")
        out[key] = value
    if cols.history and (cols.history in row or not cols.history_per_row):
        # Kept even when empty: ChatGLM-6B's P-tuning numbers the rounds of every example of such a data set.
        out["history"] = _history(row.get(cols.history), where, cols.history)
    if cols.system:
        system = row.get(cols.system)
        if system is not None and not isinstance(system, str):
            raise PtuneError(f"{where}: column {cols.system!r} is a {type(system).__name__}; it must be a string")
        if system:
            out["system"] = system
    return out


def from_rows(rows: Iterable[dict], where: str, cols: Columns) -> list[Example]:
    """Examples from rows already parsed by a library (a hub data set's split); `where` names the split in errors,
    which add the row's number (from 1)."""
    examples = [_example(row, f"{where} row {number}", cols) for number, row in enumerate(rows, start=1)]
    if not examples:
        raise PtuneError(f"{where}: holds no examples")
    return examples


def _json_lines(path: Path, text: str, cols: Columns) -> list[Example]:
    examples = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and the like, which splitlines() breaks on.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PtuneError(
                f"{where}: not a JSON object ({exc.msg} at column {exc.colno}); each line must be "
                f'{{"{cols.prompt}": ..., "{cols.response}": ...}}'
            ) from None
        if not isinstance(obj, dict):
            raise PtuneError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        examples.append(_example(obj, where, cols))
    return examples


def _csv(path: Path, text: str, cols: Columns) -> list[Example]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    wanted = [c for c in (cols.prompt, cols.response, cols.history, cols.system) if c]
    missing = [c for c in wanted if c not in (reader.fieldnames or [])]
    if missing:
        raise PtuneError(
            f"{path}:1: no column {', '.join(map(repr, missing))} in the header "
            f"{reader.fieldnames}; set fetch_data.prompt_column / response_column / history_column / "
            "system_column"
        )
    examples = []
    for row in reader:
        if not any((v or "").strip() for k, v in row.items() if k is not None):
            continue
        where = f"{path}:{reader.line_num}"
        if cols.history:  # a cell holds the list of turns as JSON; an empty cell means none
            cell = (row.get(cols.history) or "").strip()
            try:
                row[cols.history] = json.loads(cell) if cell else None
            except json.JSONDecodeError as exc:
                raise PtuneError(
                    f"{where}: column {cols.history!r} is not a JSON list ({exc.msg}); write it as "
                    '[["question", "answer"], ...]'
                ) from None
        examples.append(_example(row, where, cols))
    return examples


def read(path: str | Path, cols: Columns = Columns(), encoding: str = "utf-8") -> list[Example]:
    """Read one split: JSON lines (.json, .jsonl) or CSV (.csv, with a header row)."""
    path = Path(path)
    if not path.is_file():
        raise PtuneError(f"{path}: no such file")
    text = decode(path, encoding)
    examples = (_csv if path.suffix.lower() == ".csv" else _json_lines)(path, text, cols)
    if not examples:
        raise PtuneError(f"{path}: holds no examples")
    return examples
