"""The general, out-of-task set: texts unlike the task, on which evaluate measures what the prefix costs elsewhere.

A file of JSON lines at the fixed path data/general.jsonl (an output of fetch_data, so DVC tracks and caches
it). Each line is one example:

    {"prompt": "...", "response": "..."}

`prompt` is fed to the model as it is written (no prompt template: write a chat model's own format into it if
it should see one; "" is allowed where the response is plain text scored from its first token on) and
`response` is the reference continuation. evaluate scores the response's tokens teacher-forced (loss and
perplexity) with the prefix off and on, and generates from the first few prompts with both. Extra keys are
ignored. An empty file means that no general set was given: the report says so.

The embedded default writes its own (data/synthetic_adgen.held_out_general): plain product text of the base's
pre-training distribution that the base never saw. A real run names its file in `fetch_data.general_file`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import PtuneError

KEYS = ("prompt", "response")


def parse(text: str, source: str) -> list[dict[str, str]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PtuneError(
                f"{source} line {n}: not JSON ({exc}); expected {{'prompt': ..., 'response': ...}}"
            ) from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in KEYS):
            raise PtuneError(f"{source} line {n}: expected an object with string keys prompt and response")
        if not row["response"].strip():
            raise PtuneError(f"{source} line {n}: the response is empty; there is nothing to score")
        rows.append({k: row[k] for k in KEYS})
    return rows


def read(path: Path) -> list[dict[str, str]]:
    """The examples of a general-set file (none if it is absent or empty)."""
    if not path.is_file():
        return []
    return parse(path.read_text(encoding="utf-8"), str(path))


def dumps(rows: Iterable[dict[str, str]]) -> str:
    return "".join(json.dumps({k: r[k] for k in KEYS}, ensure_ascii=False) + "\n" for r in rows)
