"""Fault injection for the reliability suite: kill a stage at a point reached by progress, never by time.

`PTUNE_FAILPOINT=<stage>:<point>:<n>` makes `ptune <stage>` SIGKILL itself the n-th time it passes the named
point, exactly as a stopped instance would kill it: no exception handler, `finally` or atexit runs. Points are
named where work becomes durable (a step, a batch, a checkpoint, an output about to be renamed into place), so
tests can aim at the moments that matter. Unset, a failpoint costs one attribute check.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from dataclasses import dataclass, field

from ..errors import PtuneError

ENV = "PTUNE_FAILPOINT"
# With PTUNE_FAILPOINT_TRACE=FILE every point passed is appended to FILE as "<stage>\t<point>": the suite counts
# how often each point is reached in a real run and aims its kills inside that range.
TRACE_ENV = "PTUNE_FAILPOINT_TRACE"

# Every point the code passes, per stage; the reliability suite draws its (stage, point) pairs from here.
# "output" is passed once per atomically written output, just before it is renamed into place.
POINTS: dict[str, tuple[str, ...]] = {
    "fetch_weights": ("pretrain_step", "output"),
    "fetch_data": ("output",),
    "preprocess": ("output",),
    "train": ("step", "checkpoint", "output"),
    "evaluate": ("batch", "output"),
    "deploy": ("output",),
    "report": ("output",),
}


@dataclass
class _Plan:
    stage: str = ""
    point: str = ""
    n: int = 0
    running: str = ""
    trace: str = ""
    hits: Counter = field(default_factory=Counter)


# One plan per process by nature (a process runs one stage, and a kill ends the whole process), armed once by
# the CLI; module state keeps the call sites to a single `faults.point("step")` line.
_PLAN = _Plan()


def arm(stage: str) -> None:
    """Read $PTUNE_FAILPOINT for the stage this process runs (the CLI calls this before the stage starts)."""
    _PLAN.running, _PLAN.trace = stage, os.environ.get(TRACE_ENV, "")
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    try:
        target, point, n = spec.split(":")
        count = int(n)
    except ValueError:
        raise PtuneError(f"${ENV}={spec!r}: expected <stage>:<point>:<n>, e.g. train:step:3") from None
    if target == stage:
        _PLAN.stage, _PLAN.point, _PLAN.n = stage, point, count


def point(name: str) -> None:
    """Pass the failpoint `name` of the running stage; SIGKILL this process if the armed plan says so."""
    if _PLAN.trace:
        with open(_PLAN.trace, "a", encoding="utf-8") as fh:
            fh.write(f"{_PLAN.running}\t{name}\n")
    if _PLAN.point != name:
        return
    _PLAN.hits[name] += 1
    if _PLAN.hits[name] == _PLAN.n:
        os.kill(os.getpid(), signal.SIGKILL)
