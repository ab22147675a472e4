"""Run a stage in N processes on one machine: `train.devices` / `evaluate.devices` greater than 1.

`ptune train` (or `evaluate`) launches the workers itself, so a user changes one number and nothing else:
torch's elastic launcher (what `torchrun` and `accelerate launch --multi_gpu` run) starts N copies of
`python -m ptune.state.multiprocess STAGE PARAMS RESULTS` as children of the stage process, one per GPU (or, on a
machine without one, N processes sharing the CPU cores over gloo). Inside them, `accelerate` sets up the process
group and the device of each rank. The launching process keeps the stage's bookkeeping (stage log, timings) and
gets back rank 0's facts, or the error a worker raised.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from ..errors import PtuneError

log = logging.getLogger(__name__)

# Set by the elastic launcher in every worker (and by `torchrun` / `accelerate launch` when a user starts one).
WORLD_ENV = "WORLD_SIZE"
RANK_ENV = "RANK"


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


def launch(stage: str, params, n: int) -> list[dict]:
    """Run `stage` in n worker processes and wait for them; returns what each rank's `run` returned."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from . import stopping

    check_devices(f"{stage}.devices", n)
    with tempfile.TemporaryDirectory(prefix=f"ptune-{stage}-") as tmp:
        results = Path(tmp)
        params_file = results / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
        args = get_args_parser().parse_args(
            [
                "--standalone",
                f"--nproc-per-node={n}",
                "--monitor-interval=0.2",
                "-m",
                "ptune.state.multiprocess",
                stage,
                str(params_file),
                str(results),
            ]
        )
        threads = _threads_per_worker(n)
        log.info("%s: launching %d processes (%s threads each)", stage, n, threads)
        saved = {k: os.environ.get(k) for k in ("PTUNE_NUM_THREADS", "OMP_NUM_THREADS")}
        os.environ["PTUNE_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = threads
        # The launcher puts its own handlers in (they send the signal on to the workers, which end at once): ours
        # come back after it.
        handlers = {s: signal.getsignal(s) for s in stopping.SIGNALS}
        try:
            run(args)
        except SignalException as exc:
            request = stopping.note(int(exc.sigval))
            raise stopping.Stopped(
                request,
                f"{stage}: stopped ({request.reason}); its {n} processes ended at once (a stop that saves the step "
                "being computed is for one process): train resumes from its last checkpoint, evaluate from its "
                "journal",
            ) from None
        except ChildFailedError:
            errors = sorted(results.glob("error-rank*.txt"))
            if errors:
                raise PtuneError(errors[0].read_text(encoding="utf-8")) from None
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


def _exit_with_parent() -> None:
    """A worker whose launcher was killed (SIGKILL, instance stop) exits too, instead of training on as an orphan
    that would write checkpoints under the feet of the rerun."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_main(argv: list[str]) -> int:
    """Entry point of one worker: `python -m ptune.state.multiprocess STAGE PARAMS RESULTS`."""
    stage, params_path, results = argv
    _exit_with_parent()
    from .. import config
    from . import determinism

    determinism.configure_threads()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [rank {rank()}] %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        facts = importlib.import_module(f"ptune.stages.{stage}").run(config.load(params_path))
    except PtuneError as exc:
        Path(results, f"error-rank{rank()}.txt").write_text(str(exc), encoding="utf-8")
        return 2
    Path(results, f"facts-rank{rank()}.json").write_text(json.dumps(facts or {}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
