"""Stopping on request: SIGTERM, SIGINT and SIGHUP end a stage cleanly, and train and evaluate keep their progress.

An instance that stops sends SIGTERM (then SIGKILL after a grace period); a closed terminal or notebook tab sends
SIGHUP; Ctrl-C sends SIGINT. `ptune <stage>` handles the three alike:

- Where a stage can save its progress (train's step loop, evaluate's batches: `with deferred():`), the signal only
  asks: train finishes the step it is in, writes a checkpoint at that step and exits; evaluate drops the batch it
  is generating (its journal holds every finished one) and exits. Both leave `stopped.json` beside their resume
  state, which `ptune status` shows, and the rerun resumes exactly there.
- Anywhere else the stage stops at once: temp files are removed, locks released, nothing looks complete.
- With train.devices > 1 the launcher passes the signal on to its workers, and they agree after each step on
  whether to stop, so that all of them end the same one (state/multiprocess.py).

Either way the exit status is 128 + the signal's number (130 SIGINT, 143 SIGTERM, 129 SIGHUP) and the last line
says what was kept: DVC and Snakemake see a failed stage, never a finished one. A repeated signal changes nothing
(a front end may pass on one the stage already got from the terminal); SIGKILL stops at once, losing what was
not saved. A signal ignored when ptune starts (`nohup` ignores SIGHUP) stays ignored.

The front ends: `dvc repro` ignores SIGINT while a stage runs, and dies of SIGTERM or SIGHUP without passing them
on; a stage run by DVC ($DVC_STAGE) therefore also stops when the `dvc` process that started it is gone. The
Snakefile passes the three on to the stages it runs (`forward_to_stages`): left to itself, Snakemake answers
SIGTERM by waiting for running jobs to finish, which for a training is hours.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..paths import LOCK_DIR
from ..pipeline.declared import NAMES as STAGES
from . import atomic

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
RECORD = "stopped.json"  # in a stage's resume directory (.ptune/state/<stage>/<key>/)
# Set by DVC for every stage command it runs.
DVC_STAGE_ENV = "DVC_STAGE"
PARENT_POLL_S = 0.25


@dataclass(frozen=True)
class Request:
    signum: int
    reason: str  # what sent it, for the messages
    at: str  # UTC, ISO 8601

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Stopped(BaseException):
    """A stage stopped on request. A BaseException, so that no `except Exception` on the way takes it for an error
    to handle; the CLI prints its message and exits 128 + the signal number."""

    def __init__(self, request: Request, message: str):
        super().__init__(message)
        self.request = request

    @property
    def exit_code(self) -> int:
        return 128 + self.request.signum


@dataclass
class _State:
    stage: str = ""
    request: Request | None = None
    deferring: int = 0
    orphan_reason: str = ""
    worker: bool = False


_STATE = _State()


def requested() -> Request | None:
    """The stop request received so far, if any (stages poll this at their safe points)."""
    return _STATE.request


def _say(text: str) -> None:
    """A line on stderr from a signal handler: os.write, never logging or a buffered stream (the handler may run
    in the middle of either); a terminal that hung up is not an error."""
    with contextlib.suppress(OSError):
        os.write(2, f"ptune: {text}\n".encode(errors="replace"))


def _detach_from_hung_up_terminal() -> None:
    """After SIGHUP a terminal answers every write with EIO, which would end the stage on its next log line or
    progress bar: point the standard streams that were that terminal at /dev/null."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if os.isatty(fd):
                    os.dup2(null, fd)
    finally:
        os.close(null)


def note(signum: int, reason: str = "") -> Request:
    """The stop request, recorded now if none was (a signal that someone else's handler caught first)."""
    if _STATE.request is None:
        reason = reason or f"{signal.Signals(signum).name} received"
        _STATE.request = Request(signum, reason, dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    return _STATE.request


def _handler(signum: int, frame) -> None:
    if signum == signal.SIGHUP:
        _detach_from_hung_up_terminal()
    if _STATE.request is not None:
        return  # a repeat (or the same signal passed on by a front end) changes nothing
    request = note(signum, _STATE.orphan_reason)
    reason = request.reason
    if _STATE.deferring:
        if _STATE.worker:
            return  # its launcher said it (state/multiprocess.py)
        _say(
            f"{_STATE.stage}: {reason}: stopping at the next safe point (train: after this step, with a checkpoint; "
            "evaluate: after this batch). SIGKILL stops at once and loses what was not saved"
        )
        return
    raise Stopped(request, f"{_STATE.stage}: stopped ({reason}); nothing it was writing was kept")


def install(stage: str, *, worker: bool = False) -> None:
    """Handle SIGTERM, SIGINT and SIGHUP in this process (the CLI, before a stage starts); a signal ignored so far
    stays ignored. Run by DVC, the stage also stops when the `dvc` process is gone. `worker`: one of the processes
    that `train.devices` > 1 launches (state/multiprocess.py), whose launcher announces the stop and watches dvc."""
    _STATE.stage, _STATE.request, _STATE.deferring, _STATE.orphan_reason = stage, None, 0, ""
    _STATE.worker = worker
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _handler)
    if os.environ.get(DVC_STAGE_ENV) and not worker:
        _watch_dvc()


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of a process from /proc, or None when it is gone or /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # after the command name, which may hold anything
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), fields[19]


def _dvc_process() -> tuple[int, str] | None:
    """(pid, start time) of the `dvc` process that runs this stage: the nearest ancestor whose environment lacks
    $DVC_STAGE, which DVC sets for the stage's command only. DVC starts the command through $SHELL; a shell that
    does not exec it (fish, or a wrapper script) stays between the two, and outlives a killed dvc. None where
    /proc cannot tell."""
    pid = os.getppid()
    for _ in range(8):
        stat = _stat(pid)
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return None
        if stat is None:
            return None
        if not any(entry.startswith(DVC_STAGE_ENV.encode() + b"=") for entry in environ):
            return pid, stat[2]
        pid = stat[1]
    return None


def _watch_dvc() -> None:
    """`dvc repro` killed by SIGTERM or SIGHUP leaves its stage running with no one to record the result: stop it
    as if it had got the signal itself (the next `dvc repro` resumes it). Watched: the dvc process itself (gone,
    or a zombie its own parent has not reaped yet), else this process's parent."""
    parent = os.getppid()
    found = _dvc_process()

    def dvc_alive() -> bool:
        if found is None:
            return os.getppid() == parent
        stat = _stat(found[0])
        return stat is not None and stat[0] != "Z" and stat[2] == found[1]

    def watch() -> None:
        while dvc_alive():
            time.sleep(PARENT_POLL_S)
        if _STATE.request is None:
            pid = found[0] if found else parent
            _STATE.orphan_reason = f"the process that started it (pid {pid}, dvc) is gone"
            with contextlib.suppress(OSError):
                os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-dvc", daemon=True).start()


def relay(signum: int, reason: str) -> None:
    """Act on a signal that another process got, as if it had come here, with that process's reason: a worker of
    `train.devices` > 1 for its launcher (state/multiprocess.py). Nothing if a request is here already."""
    if _STATE.request is None:
        _STATE.orphan_reason = reason
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside: a signal only sets the request, which the stage acts on at its next safe point. A request already
    there when the block starts is acted on at once."""
    if _STATE.request is not None:
        raise Stopped(_STATE.request, f"{_STATE.stage}: stopped ({_STATE.request.reason}) before it began its work")
    _STATE.deferring += 1
    try:
        yield
    finally:
        _STATE.deferring -= 1


def record(directory: Path, **facts) -> Path:
    """Write `stopped.json` (what stopped the run, when, and how far it got) into a resume directory."""
    request = _STATE.request
    entry = {
        "stage": _STATE.stage,
        "signal": request.name if request else None,
        "reason": request.reason if request else None,
        "at": request.at if request else None,
        "pid": os.getpid(),
        **facts,
    }
    path = Path(directory) / RECORD
    atomic.write_json(path, entry)
    return path


def read_record(directory: Path | None) -> dict | None:
    """The `stopped.json` of a resume directory, or None (none, or not readable: it only informs)."""
    if directory is None:
        return None
    try:
        entry = json.loads((Path(directory) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def running_stages(lock_dir: Path = LOCK_DIR) -> dict[str, int]:
    """stage -> pid of the `ptune <stage>` running in this checkout now (the holder of its lock, state/locks.py)."""
    found: dict[str, int] = {}
    for stage in STAGES:
        path = lock_dir / f"{stage}.lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if pid.isdigit():
                    found[stage] = int(pid)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)  # not held: no stage is running
        finally:
            os.close(fd)
    return found


def forward_to_stages(lock_dir: Path = LOCK_DIR) -> None:
    """For a front end's process (the Snakefile's `onstart`): on SIGTERM, SIGINT or SIGHUP, first pass the signal
    on to the ptune stages running in this checkout, then do what the front end did. SIGHUP, which would kill
    Snakemake outright and leave its jobs running, does what its SIGTERM does: no new job, wait for the running
    ones (which now stop at their next safe point), exit."""
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def forward(signum: int, frame) -> None:
        for stage, pid in running_stages(lock_dir).items():
            try:
                os.kill(pid, signum)
                print(f"ptune: passed {signal.Signals(signum).name} on to {stage} (pid {pid})", file=sys.stderr)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
        then = previous[signum]
        if signum == signal.SIGHUP and then is signal.SIG_DFL:
            then = previous[signal.SIGTERM]
        if callable(then):  # Snakemake's own handler (SIGTERM), or Python's KeyboardInterrupt (SIGINT)
            then(signum, frame)
        elif then is signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for signum in SIGNALS:
        if previous[signum] is not signal.SIG_IGN:
            signal.signal(signum, forward)
