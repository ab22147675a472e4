"""Live metrics: what a running stage has done so far, readable while it runs, through the trackers a user picks.

`train` sends each row of reports/train_log.csv (step, loss, learning_rate, samples_per_s) as it is made, and
`evaluate` its progress after each generated batch, to every tracker $PTUNE_TRACKERS names (comma-separated;
default `dvclive`; `none` for no tracker):

  dvclive      reports/live/<stage>/: metrics.json (the latest values and step) and plots/metrics/<name>.tsv (one
               row per step), what `dvc plots show`, DVC's VS Code extension and `tail -f` read
  tensorboard  reports/live/<stage>/tensorboard/ (event files: `tensorboard --logdir reports/live`); needs the
               tensorboard package (`pip install tensorboard`)
  mlflow       a run named after the stage in the experiment $MLFLOW_EXPERIMENT_NAME (default `ptune`) of the
               tracking server $MLFLOW_TRACKING_URI, which must be set (`http://host:5000`, `sqlite:///mlflow.db`):
               ptune contacts nothing the user did not name; needs mlflow (`pip install mlflow-skinny`)
  wandb        a run named after the stage in the W&B project $WANDB_PROJECT (default `ptune`), files under
               reports/live/<stage>/wandb/; W&B's own settings apply (`wandb login` or WANDB_API_KEY;
               WANDB_MODE=offline keeps it on this machine, `wandb sync` sends it later), except that the run holds
               the metrics alone (WANDB_SETTINGS below); needs wandb

An environment variable, not a param: params are part of the stages' hashes, and watching a run must not rerun it.
reports/live/<stage>/ is a declared output of its stage (dvc.yaml), cached and pushed like the others.

Each start writes the folder anew from the history the stage resumes with (the rows its checkpoint holds), so a
resumed run continues its curve from the checkpoint's step and no step appears twice; what a killed run logged
after its last checkpoint is dropped with it. The folder is removed first, never written into: after a DVC run its
files may be hard links into DVC's cache (cache.type hardlink), which a write in place would corrupt. Trackers are
extra: one that fails is logged once and dropped, and the stage goes on; the error is logged with every URL's
credentials masked (`_masked`), since a tracker's error names the server it could not reach.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from ..errors import PtuneError

log = logging.getLogger(__name__)

ENV = "PTUNE_TRACKERS"
DEFAULT = ("dvclive",)
TRACKERS = ("dvclive", "tensorboard", "mlflow", "wandb")
TENSORBOARD_DIR = "tensorboard"

Values = Mapping[str, float]

# What W&B would otherwise add to its run folder, reports/live/<stage>/wandb/, which DVC caches and `dvc push` sends to
# the remote (and the run to W&B): the host name, the command line and program, the git remote URL (which may carry
# a token) and commit, the code, the console output, the installed packages, the machine's identity. The run holds
# ptune's metrics and W&B's system metrics (CPU, GPU, memory use) alone. Passed to wandb.init, these win over the
# WANDB_* variables. (All exist since wandb 0.19, the extra's floor.)
WANDB_SETTINGS = {
    "host": "",  # recorded with the run even without its metadata; "" is left out
    "x_disable_meta": True,
    "x_disable_machine_info": True,
    "disable_git": True,
    "disable_code": True,
    "save_code": False,
    "console": "off",
    "x_save_requirements": False,
}
# The user name and password of a URL (`https://user:token@host`): up to the last @ before the host.
_USERINFO = re.compile(r"(?<=://)[^\s/]*@")


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


def _missing(name: str, package: str, exc: ImportError) -> PtuneError:
    return PtuneError(
        f"{ENV} names {name}, which is not installed here ({exc}); `pip install {package}`, or leave it out of {ENV}"
    )


class _MLflow:
    """Through MLflow's own client (no fluent API: no process-wide active run); every start is a new run."""

    def __init__(self, folder: Path, history: Iterable[tuple[int, Values]]):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing("mlflow", "mlflow-skinny", exc) from None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise PtuneError(
                f"{ENV} names mlflow, but MLFLOW_TRACKING_URI is not set: set it to your tracking server "
                "(http://host:5000) or a local database (sqlite:///mlflow.db)"
            )
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ptune")
        experiment = self.client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=folder.name).info.run_id
        for step, values in history:
            self.log(step, values)

    def log(self, step: int, values: Values) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    """Through wandb's own run object; every start is a new run (steps must rise within a run)."""

    def __init__(self, folder: Path, history: Iterable[tuple[int, Values]]):
        try:
            import wandb
        except ImportError as exc:
            raise _missing("wandb", "wandb", exc) from None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ptune"),
            name=folder.name,
            dir=str(folder),
            reinit="create_new",
            settings=wandb.Settings(**WANDB_SETTINGS),
        )
        for step, values in history:
            self.log(step, values)

    def log(self, step: int, values: Values) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


def _masked(error: Exception) -> str:
    """`error`'s text for the log with every URL's user name and password masked: MLflow names the server it could
    not reach (`API request to https://user:token@host/...`), and the log goes to the terminal, DVC's and
    Snakemake's logs, and CI's."""
    return _USERINFO.sub("***@", str(error))


_MAKERS = {"dvclive": _DvcLive, "tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


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
                log.warning("live metrics: %s could not start, going on without it: %s", name, _masked(exc))

    def log(self, step: int, values: Values) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(step, values)
            except Exception as exc:  # noqa: BLE001
                log.warning("live metrics: %s failed at step %d, going on without it: %s", name, step, _masked(exc))
                del self.trackers[name]

    def close(self) -> None:
        for name, tracker in self.trackers.items():
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("live metrics: %s failed while closing: %s", name, _masked(exc))
        self.trackers = {}
