"""Live metrics: what a running stage has done so far, readable while it runs, through the trackers a user picks.

`train` sends each row of reports/train_log.csv (step, loss, learning_rate, samples_per_s) as it is made, and
`evaluate` its progress after each generated batch, to every tracker $PTUNE_TRACKERS names (comma-separated;
default `dvclive`; `none` for no tracker):

  dvclive      reports/live/<stage>/: metrics.json (the latest values and step) and plots/metrics/<name>.tsv (one
               row per step), what `dvc plots show`, DVC's VS Code extension and `tail -f` read
  tensorboard  reports/live/<stage>/tensorboard/ (event files: `tensorboard --logdir reports/live`); needs the
               tensorboard package (`pip install tensorboard`)

An environment variable, not a param: params are part of the stages' hashes, and watching a run must not rerun it.
reports/live/<stage>/ is a declared output of its stage (dvc.yaml), cached and pushed like the others.

Each start writes the folder anew from the history the stage resumes with (the rows its checkpoint holds), so a
resumed run continues its curve from the checkpoint's step and no step appears twice; what a killed run logged
after its last checkpoint is dropped with it. The folder is removed first, never written into: after a DVC run its
files may be hard links into DVC's cache (cache.type hardlink), which a write in place would corrupt. Trackers are
extra: one that fails is logged once and dropped, and the stage goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from ..errors import PtuneError

log = logging.getLogger(__name__)

ENV = "PTUNE_TRACKERS"
DEFAULT = ("dvclive",)
TRACKERS = ("dvclive", "tensorboard")
TENSORBOARD_DIR = "tensorboard"

Values = Mapping[str, float]


def chosen(value: str | None = None) -> tuple[str, ...]:
    """The trackers $PTUNE_TRACKERS names (read at a stage's start: a typo fails before hours of work)."""
    value = os.environ.get(ENV) if value is None else value
    if value is None or not value.strip():
        return DEFAULT
    names = tuple(dict.fromkeys(n.strip().lower() for n in value.split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise PtuneError(
            f"{ENV}={value!r}: unknown tracker {', '.join(map(repr, unknown)) or repr(value)}; name one or more of "
            f"{', '.join(TRACKERS)} (comma-separated), or `none`; unset, it is {','.join(DEFAULT)}"
        )
    return names


class Tracker(Protocol):
    def log(self, step: int, values: Values) -> None: ...

    def close(self) -> None: ...


class _DvcLive:
    """DVCLive, as a logger only: no dvc.yaml of its own (the project's declares the folder), no experiment saved
    (`dvc exp run` saves experiments; DVCLive is not the front end)."""

    def __init__(self, folder: Path, history: Iterable[tuple[int, Values]]):
        from dvclive import Live

        self.live = Live(dir=str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
        replayed = False
        for step, values in history:  # one append per value, one summary at the end: cheap even for long runs
            self._append(step, values)
            replayed = True
        if replayed:
            self.live.make_summary()

    def _append(self, step: int, values: Values) -> None:
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, value)

    def log(self, step: int, values: Values) -> None:
        self._append(step, values)
        self.live.make_summary()  # metrics.json: the latest values, with their step

    def close(self) -> None:
        self.live.make_summary()


class _TensorBoard:
    def __init__(self, folder: Path, history: Iterable[tuple[int, Values]]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise PtuneError(
                f"{ENV} names tensorboard, which is not installed here ({exc}); `pip install tensorboard`, or "
                f"leave it out of {ENV}"
            ) from None
        self.writer = SummaryWriter(log_dir=str(folder / TENSORBOARD_DIR))
        for step, values in history:
            self._add(step, values)
        self.writer.flush()

    def _add(self, step: int, values: Values) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def log(self, step: int, values: Values) -> None:
        self._add(step, values)
        self.writer.flush()  # readable now, not at the writer's next periodic flush

    def close(self) -> None:
        self.writer.close()


_MAKERS = {"dvclive": _DvcLive, "tensorboard": _TensorBoard}


class Live:
    """The trackers of one stage run, behind one `log(step, values)`; rank 0 of a multi-process run only."""

    def __init__(self, folder: Path, history: Iterable[tuple[int, Values]] = (), names: Iterable[str] | None = None):
        self.folder = Path(folder)
        names = chosen() if names is None else tuple(names)
        history = list(history)
        # Removed, never written into: its files may be hard links into DVC's cache.
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.folder.exists() or self.folder.is_symlink():
            self.folder.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.trackers: dict[str, Tracker] = {}
        for name in names:
            try:
                self.trackers[name] = _MAKERS[name](self.folder, history)
            except PtuneError:
                raise
            except Exception as exc:  # noqa: BLE001 - a tracker is extra: say why, go on without it
                log.warning("live metrics: %s could not start, going on without it: %s", name, exc)

    def log(self, step: int, values: Values) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(step, values)
            except Exception as exc:  # noqa: BLE001
                log.warning("live metrics: %s failed at step %d, going on without it: %s", name, step, exc)
                del self.trackers[name]

    def close(self) -> None:
        for name, tracker in self.trackers.items():
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("live metrics: %s failed while closing: %s", name, exc)
        self.trackers = {}
