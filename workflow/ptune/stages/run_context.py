"""The run context: what a stage run holds besides its computation, opened by the stage, passed to compute/.

A stage that keeps progress (train, evaluate) opens one and hands it (or a part of it that compute/ names as a
Protocol, e.g. compute/evaluation.py's BatchRun) to the compute functions, instead of threading each concern
through their arguments:

- stop requests (state/stopping.py): `deferred()` marks where a signal only asks; `stop_request()` polls;
- fault points (state/faults.py): `fault(point)`;
- live metrics (reporting/live.py): `track(history)` opens the trackers $PTUNE_TRACKERS names, `log(step, values)`;
- resume state (state/resume.py): `resume(inputs, key)` opens .ptune/state/<stage>/<key>/, `journal(name, rank)`
  one process's journal in it, `record_stop(**facts)` writes `stopped.json` there, `finish()` removes it;
- pushes of that state to the DVC remote (remote/checkpoints.py), every $PTUNE_CHECKPOINT_PUSH_EVERY-th checkpoint
  and on a stop.

The settings that come from the environment are read when the context opens, before any model loads: a typo
fails in a second, not after hours of work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..paths import live
from ..remote import checkpoints
from ..remote.dvc_remote import checkpoint_push_every
from ..reporting import live as live_metrics
from ..state import faults, stopping
from ..state.resume import Journal, ResumeState


class RunContext:
    """One stage run's stop requests, fault points, live trackers, resume state and pushes."""

    def __init__(self, stage: str, *, trackers: tuple[str, ...] = (), push_every: int = 0):
        self.stage = stage
        self.trackers = trackers
        self.push_every = push_every  # 0: the resume state is never pushed while the stage runs
        self.state: ResumeState | None = None
        self.live: live_metrics.Live | None = None
        self.checkpoints = 0  # written by this run, for push_every

    @classmethod
    def open(cls, stage: str, *, pushes: bool = False) -> RunContext:
        """$PTUNE_CHECKPOINT_PUSH_EVERY (where the stage `pushes` checkpoints) and $PTUNE_TRACKERS, read now."""
        push_every = checkpoint_push_every() if pushes else 0
        return cls(stage, trackers=live_metrics.chosen(), push_every=push_every)

    # Stop requests and fault points

    def deferred(self) -> contextlib.AbstractContextManager[None]:
        """Inside: a stop request waits for the stage's next safe point (state/stopping.py)."""
        return stopping.deferred()

    def stop_request(self) -> stopping.Request | None:
        return stopping.requested()

    def fault(self, point: str) -> None:
        faults.point(point)

    # Live metrics

    def track(self, history: Iterable[tuple[int, Mapping[str, float]]] = ()) -> None:
        """Open the live trackers in reports/live/<stage>/, `history` first (the rows a resumed run has)."""
        self.live = live_metrics.Live(live(self.stage), history, self.trackers)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if self.live is not None:
            self.live.log(step, values)

    def close_live(self) -> None:
        if self.live is not None:
            self.live.close()

    # Resume state

    def resume(self, inputs: list[Path], key: Any) -> ResumeState:
        """The resume directory for these inputs and params (set aside or removed: other keys' directories)."""
        self.state = ResumeState(self.stage, inputs, key)
        return self.state

    def journals(self, name: str) -> list[Path]:
        """The journal files of `name`, one per process that worked on it (in this or an earlier run)."""
        return sorted(self.state.dir.glob(f"{name}.rank*.jsonl"))

    def journal(self, name: str, rank: int) -> Journal:
        """This process's journal of `name`; the units the other processes' journals hold count as done."""
        return Journal(self.state.path(f"{name}.rank{rank}.jsonl"), also_read=self.journals(name))

    def record_stop(self, **facts) -> Path:
        """`stopped.json` beside the resume state: what stopped the run and how far it got."""
        return stopping.record(self.state.dir, **facts)

    def finish(self) -> None:
        """The stage is complete: live metrics closed, resume state removed."""
        self.close_live()
        self.state.finish()

    # Pushes

    def checkpoint_written(self) -> None:
        """Every push_every-th checkpoint goes to the DVC remote, where a fresh instance finds it
        (docs/surviving.md)."""
        self.checkpoints += 1
        if self.push_every and self.checkpoints % self.push_every == 0:
            checkpoints.push_quietly(self.stage)

    def push_on_stop(self) -> bool:
        """The instance may be going away: send the resume state where the next one can find it (where pushes are
        on). Whether it was pushed."""
        return bool(self.push_every) and checkpoints.push_quietly(self.stage)

    def batches(self, journal: Journal, progress: Callable[[int, int], None]) -> JournalledBatches:
        """What generate_all (compute/evaluation.py) asks of the run, for the batches `journal` keeps."""
        return JournalledBatches(self, journal, progress)


class JournalledBatches:
    """compute/evaluation.py's BatchRun over a journal: finished batches are journalled, then the "batch" fault
    point passed; stop requests are the context's."""

    def __init__(self, context: RunContext, journal: Journal, progress: Callable[[int, int], None]):
        self.context, self.journal, self._progress = context, journal, progress

    @property
    def done(self) -> Mapping[int, list[str]]:
        return self.journal.done

    def stop_request(self) -> stopping.Request | None:
        return self.context.stop_request()

    def batch_done(self, batch: int, texts: list[str]) -> None:
        self.journal.record(batch, texts)
        self.context.fault("batch")

    def progress(self, batches_done: int, examples_done: int) -> None:
        self._progress(batches_done, examples_done)
