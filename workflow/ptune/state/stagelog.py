"""What "a stage executed" means, defined once: every `ptune <stage>` run appends a line to .ptune/stage.log.

Tests of the DVC/Snakemake wiring assert on this log. The wall time of each run goes to
reports/timings/<stage>.json (a declared output of that stage), never into metrics or predictions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from ..paths import PTUNE_DIR, STAGE_LOG, timings
from . import atomic


def record_start(stage: str) -> None:
    PTUNE_DIR.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    # O_APPEND writes of one short line are atomic, so concurrent stages (--cores 2) never interleave.
    with open(STAGE_LOG, "a", encoding="utf-8") as fh:
        fh.write(f"{stage}\t{now}\t{os.getpid()}\n")


def executed_stages(log: Path = STAGE_LOG) -> list[str]:
    """Stage names in the order they executed (empty if nothing ran)."""
    if not log.is_file():
        return []
    return [line.split("\t", 1)[0] for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]


# What DVC does not hash: the libraries a stage ran with (requirements/lock.txt pins every one but torch, which is
# chosen per machine). Recorded with each stage's timing; `ptune status` compares them with this environment's.
VERSIONED = ("torch", "transformers", "tokenizers")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@contextlib.contextmanager
def timed(stage: str) -> Iterator[dict]:
    """Time the body and write reports/timings/<stage>.json when it succeeds; the body may add fields
    (a stage's `run` returns them, e.g. evaluate's examples/s)."""
    extra: dict = {}
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    yield extra
    record = {
        "stage": stage,
        "started": started.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 3),
        "host": platform.node(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "versions": versions(),
        "environment": sys.prefix,  # ChatGLM-6B's stages run in their own (model/legacy_env.py)
        **extra,
    }
    atomic.write_json(timings(stage), record)
