"""Run a stage in N processes on one machine: `train.devices` / `evaluate.devices` greater than 1.

`ptune train` (or `evaluate`) launches the workers itself, so a user changes one number and nothing else:
torch's elastic launcher (what `torchrun` and `accelerate launch --multi_gpu` run) starts N copies of
`python -m ptune.stages.worker STAGE PARAMS RESULTS` (WORKER) as children of the stage process, one per GPU (or, on a
machine without one, N processes sharing the CPU cores over gloo). Inside them, `accelerate` sets up the process
group and the device of each rank. The launching process keeps the stage's bookkeeping (stage log, timings) and
gets back rank 0's facts, or the error a worker raised.

Stopping (state/stopping.py). Run in the main thread, torch's launcher answers SIGTERM, SIGINT and SIGHUP by passing
them on to its workers, which end at once. For train (GRACEFUL) it runs in a thread of its own, which leaves ptune's
handlers in place: the launcher writes the signal into a file that every worker watches (`stop`, beside the params;
the workers run in sessions of their own, so a terminal's Ctrl-C reaches the launcher alone) and each worker signals
itself. Train's step loop agrees on a stop across the ranks after every step (a max all-reduce of the signal number,
so a signal that reached one worker alone counts too): every rank ends the same step, rank 0 writes the checkpoint,
and all of them exit with 128 + the signal's number, leaving `stopped-rank<r>.json` for the launcher, which ends
with rank 0's line and that status. evaluate's processes still end at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ..errors import PtuneError

log = logging.getLogger(__name__)

# Set by the elastic launcher in every worker (and by `torchrun` / `accelerate launch` when a user starts one).
WORLD_ENV = "WORLD_SIZE"
RANK_ENV = "RANK"
# The stages whose workers stop together at a safe point; the others' processes end at once on a signal.
GRACEFUL = ("train",)
# The module each worker runs: above this one (it loads the params and runs the stage), named, not imported.
WORKER = "ptune.stages.worker"
STOP_FILE = "stop"  # in the results folder: the signal the launcher got, for its workers
WATCH_S = 0.1  # how often a worker looks for its launcher and the stop file


def in_worker() -> bool:
    """True inside a launched process of a multi-process world: the stage must not launch again."""
    return int(os.environ.get(WORLD_ENV, "1")) > 1


def rank() -> int:
    return int(os.environ.get(RANK_ENV, "0"))


def world_size() -> int:
    return int(os.environ.get(WORLD_ENV, "1"))


def local_device():
    """This process's device: its own GPU (LOCAL_RANK, set by the launcher) or the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def accelerator():
    """The accelerate Accelerator of this process: DDP over gloo on CPUs, NCCL on GPUs, nothing in one process.

    `cpu=` must be said: without it accelerate sees a launched world on a machine without a GPU as one process.
    Mixed precision stays ours (autocast and loss scaling in train.py), so accelerate is told "no".
    """
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


def _threads_per_worker(n: int) -> str:
    """On CPUs the workers share the cores: n processes with all cores each would oversubscribe them."""
    import torch

    if os.environ.get("PTUNE_NUM_THREADS"):
        return os.environ["PTUNE_NUM_THREADS"]
    if torch.cuda.is_available():
        return "1"  # the GPU computes; one thread per process feeds it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return str(max(1, cores // n))


def check_devices(key: str, n: int) -> None:
    """Refuse more processes than GPUs (each rank owns one); on CPUs any n runs, slowly past the core count."""
    import torch

    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise PtuneError(
            f"{key}: {n}, but this machine has {torch.cuda.device_count()} GPU(s); set {key} to at "
            f"most {torch.cuda.device_count()} (one process per GPU)"
        )


def _tell_workers(results: Path) -> None:
    """From here SIGTERM, SIGINT and SIGHUP only ask (stopping.deferred) and are written down for the workers
    (`_watch_launcher`); one ignored (nohup) stays ignored."""
    from . import stopping

    def tell(signum: int, frame) -> None:
        if callable(previous[signum]):
            previous[signum](signum, frame)  # stopping's handler: notes the request and says so
        request = stopping.note(signum)  # the first one's, for a repeat
        tmp = results / f".{STOP_FILE}.tmp"
        tmp.write_text(json.dumps({"signum": request.signum, "reason": request.reason}), encoding="utf-8")
        os.replace(tmp, results / STOP_FILE)  # whole: a worker never reads half of it

    previous = {s: signal.getsignal(s) for s in stopping.SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, tell)


def _stopped(stage: str, results: Path, n: int, failures: dict):
    """The workers' stop (stopping.Stopped, rank 0's line), or None when none of them stopped on request."""
    from . import stopping

    exits = ", ".join(f"rank {r}: {f.exitcode}" for r, f in sorted(failures.items()))
    log.info("%s: its processes exited with %s", stage, exits)
    records = {int(f.stem.rsplit("rank", 1)[1]): f for f in results.glob("stopped-rank*.json")}
    if records:
        first = json.loads(records[min(records)].read_text(encoding="utf-8"))
        request = stopping.note(first["signum"], f"{signal.Signals(first['signum']).name} received by a worker")
        if len(records) < n:
            log.warning("%s: %d of its %d processes stopped on request, the others otherwise", stage, len(records), n)
        return stopping.Stopped(request, first["message"])
    if stopping.requested() is not None:
        request = stopping.requested()
        return stopping.Stopped(
            request,
            f"{stage}: stopped ({request.reason}); its {n} processes ended before a safe point: train resumes from "
            "its last checkpoint",
        )
    return None


class _NoSignalWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to register signal handlers")


def _run_in_thread(run, args) -> None:
    """torch's launcher in a thread of its own, where it leaves the signal handlers alone (it would say so: not
    here), while the main thread, which Python runs them in, waits for it."""
    torch_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    outcome: list[BaseException] = []

    def target() -> None:
        try:
            run(args)
        except BaseException as exc:  # noqa: BLE001 -- raised again in the main thread
            outcome.append(exc)

    quiet = _NoSignalWarning()
    torch_log.addFilter(quiet)
    thread = threading.Thread(target=target, name="ptune-launcher")
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
    finally:
        torch_log.removeFilter(quiet)
    if outcome:
        raise outcome[0]


def launch(stage: str, params, n: int) -> list[dict]:
    """Run `stage` in n worker processes and wait for them; returns what each rank's `run` returned."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from . import stopping

    check_devices(f"{stage}.devices", n)
    graceful = stage in GRACEFUL
    with tempfile.TemporaryDirectory(prefix=f"ptune-{stage}-") as tmp:
        results = Path(tmp)
        params_file = results / "params.yaml"
        # The file as the stage read it (an edit while the workers start is not theirs); each worker reads it in the
        # stage's params scope (PTUNE_STAGE), as the stage did.
        shutil.copyfile(params.path, params_file)
        args = get_args_parser().parse_args(
            [
                "--standalone",
                f"--nproc-per-node={n}",
                "--monitor-interval=0.2",
                "-m",
                WORKER,
                stage,
                str(params_file),
                str(results),
            ]
        )
        threads = _threads_per_worker(n)
        log.info("%s: launching %d processes (%s threads each)", stage, n, threads)
        saved = {k: os.environ.get(k) for k in ("PTUNE_NUM_THREADS", "OMP_NUM_THREADS")}
        os.environ["PTUNE_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = threads
        # In the main thread torch's launcher puts its own handlers in (they send the signal on to the workers,
        # which end at once); ours come back after it. A graceful stage keeps ours.
        handlers = {s: signal.getsignal(s) for s in stopping.SIGNALS}
        try:
            if graceful:
                _tell_workers(results)
                with stopping.deferred():
                    _run_in_thread(run, args)
            else:
                run(args)
        except SignalException as exc:
            request = stopping.note(int(exc.sigval))
            raise stopping.Stopped(
                request,
                f"{stage}: stopped ({request.reason}); its {n} processes ended at once: the rerun resumes from what "
                "they saved (evaluate: its journal)",
            ) from None
        except ChildFailedError as exc:
            errors = sorted(results.glob("error-rank*.txt"))
            if errors:
                raise PtuneError(errors[0].read_text(encoding="utf-8")) from None
            if graceful and (stop := _stopped(stage, results, n, exc.failures)) is not None:
                raise stop from None
            raise PtuneError(f"{stage}.devices: {n}: a worker process failed; its traceback is above") from None
        finally:
            for s, handler in handlers.items():
                if handler is not None:
                    signal.signal(s, handler)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return [json.loads((results / f"facts-rank{r}.json").read_text(encoding="utf-8")) for r in range(n)]


def _watch_launcher(stop_file: Path | None) -> None:
    """A worker whose launcher was killed (SIGKILL, instance stop) exits too, instead of training on as an orphan
    that would write checkpoints under the feet of the rerun. A signal its launcher got and wrote into `stop_file`
    it sends itself (the workers run in sessions of their own: a terminal's Ctrl-C does not reach them)."""
    from . import stopping

    parent = os.getppid()

    def watch() -> None:
        told = stop_file is None
        while os.getppid() == parent:
            if not told and stop_file.is_file():
                told = True
                with contextlib.suppress(OSError, ValueError, KeyError):
                    stop = json.loads(stop_file.read_text(encoding="utf-8"))
                    stopping.relay(stop["signum"], stop["reason"])
            time.sleep(WATCH_S)
        os._exit(3)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def _stopped_worker(results: str, stop) -> NoReturn:
    """A worker stopped on request: done with signals (torch's launcher sends the others SIGTERM once one has
    ended), its stop written down for the launcher, exit with 128 + the signal's number at once: what it had to
    write is written, and tearing down the interpreter, torch and its process group takes a second or more."""
    from . import stopping

    for s in stopping.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    record = {"signum": stop.request.signum, "message": str(stop)}
    tmp = Path(results, f".stopped-rank{rank()}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, Path(results, f"stopped-rank{rank()}.json"))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(stop.exit_code)


def run_worker(stage: str, results: str, work: Callable[[], dict | None]) -> int:
    """One worker's life around its `work` (the stage's run on the params it was handed; stages/worker.py): stop
    requests, the launcher's stop file, and the results the launcher reads back."""
    graceful = stage in GRACEFUL
    from . import stopping

    if graceful:
        stopping.install(stage, worker=True)  # before the watch, which may pass a signal on at once
    _watch_launcher(Path(results, STOP_FILE) if graceful else None)
    from . import determinism

    determinism.configure_threads()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [rank {rank()}] %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        facts = work()
    except PtuneError as exc:
        Path(results, f"error-rank{rank()}.txt").write_text(str(exc), encoding="utf-8")
        return 2
    except stopping.Stopped as stop:
        _stopped_worker(results, stop)
    except Exception as exc:
        if not graceful or (request := stopping.requested()) is None:
            raise
        # Another process stopped at once (while loading, before the step loop) during a collective operation
        # with this one: the error is the stop's doing.
        log.warning("%s: %s: %s, after the stop request", stage, type(exc).__name__, exc)
        _stopped_worker(
            results, stopping.Stopped(request, f"{stage}: stopped ({request.reason}); nothing it was writing was kept")
        )
    Path(results, f"facts-rank{rank()}.json").write_text(json.dumps(facts or {}), encoding="utf-8")
    return 0
