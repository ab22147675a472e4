"""Stage train: learn a P-tuning v2 prefix on data/processed/train with the base frozen; save only the prefix.

One loop to read top to bottom: load, (resume), step, log, checkpoint, save. The steps are compute/training.py's
(Trainer); stop requests, fault points, live metrics, the resume state and its pushes are the run context's
(stages/run_context.py). Outputs: models/ptuning/
(prefix.safetensors + prefix_config.json), reports/train_log.csv (step,loss,learning_rate,samples_per_s; rewritten
whole, atomically, at each row, so it can be watched while it grows) and reports/live/train/ (the same rows
through the trackers $PTUNE_TRACKERS names, reporting/live.py). Checkpoints go to .ptune/state/train/<key>/
(outside the declared outputs, which DVC and Snakemake delete before a rerun): a killed run resumes from the last
one and ends with the prefix an uninterrupted run makes. SIGTERM, SIGINT or SIGHUP end the step being computed,
write a checkpoint at it and stop (state/stopping.py): the rerun resumes from that very step. With train.devices > 1
the processes agree after each step whether to stop, so that all of them end the same one (state/multiprocess.py).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from ..compute.training import DTYPES, Step, Trainer, check_context, check_precision
from ..config import Params, TrainConfig
from ..errors import PtuneError
from ..model import backends, device_info
from ..model.loading import assert_frozen, device
from ..paths import BASE, TRAIN_LOG
from ..paths import PREFIX as OUT
from ..paths import PROCESSED as DATA
from ..state import atomic, checkpoint, multiprocess, stopping
from ..state.determinism import seed_everything
from ..state.resume import ResumeState
from .run_context import RunContext

log = logging.getLogger(__name__)

CKPT_SUFFIX = ".safetensors"
# Fields that change neither the data order nor the numbers: editing them keeps checkpoints usable.
NOT_IN_RESUME_KEY = ("logging_steps", "save_steps", "save_total_limit")
LOG_HEADER = ("step", "loss", "learning_rate", "samples_per_s")


def run(params: Params) -> dict:
    cfg = params.train
    backend = _backend(cfg)  # checks that need no model come first: a wrong setting fails at once
    if cfg.devices > 1 and not multiprocess.in_worker():
        return {**multiprocess.launch("train", params, cfg.devices)[0], "devices": cfg.devices}

    # $PTUNE_CHECKPOINT_PUSH_EVERY and $PTUNE_TRACKERS read first: a bad value should fail before hours of work.
    ctx = RunContext.open("train", pushes=True)
    seed_everything(cfg.seed)  # the same seed on every rank: the prefix (and its dropout) starts equal everywhere
    acc = _accelerator(cfg)
    trainer, sizes = _load(backend, cfg, acc)
    key_params = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_RESUME_KEY}
    with acc.main_process_first():  # rank 0 removes stale state before the others look
        ctx.resume([BASE, DATA], key_params)
    start, rows, resumed_window = _resume(ctx, trainer)
    acc.wait_for_everyone()  # every rank has read the checkpoint before rank 0 may write (and prune) the next

    trainer.share()
    t_start = time.perf_counter()
    curve = Curve(rows, resumed_window)
    if acc.is_main_process:
        # The curve so far (the checkpoint's rows), then each new row as it is made: no step twice after a resume.
        write_log(curve.rows)
        ctx.track((r[0], live_values(r)) for r in curve.rows)
    # From here a stop request ends the step being computed and is saved (state/stopping.py); before, while
    # loading, there is nothing to save and it stops at once.
    with ctx.deferred():
        _steps(ctx, trainer, curve, start)
        train_s = time.perf_counter() - t_start

        # A request that comes while the outputs are written lets them finish: the stage then ends complete.
        if acc.is_main_process:
            with atomic.atomic_dir(OUT) as tmp:
                backend.save_prefix(trainer.model, trainer.encoder, tmp, BASE)
            write_log(curve.rows)
            ctx.finish()
        acc.wait_for_everyone()
    if ctx.stop_request() is not None:
        log.warning("a stop was requested while the outputs were written; they are complete, so train finished")
    return _facts(trainer, sizes, start, train_s)


def _backend(cfg: TrainConfig) -> backends.Backend:
    """The backend of the base, once the settings it cannot train with are refused."""
    check_precision(cfg, device())
    backend = backends.for_base(BASE)
    backend.check_quantization(cfg.quantization, "train", device())
    if cfg.devices > 1 and not backend.multi_device_training:
        raise PtuneError(
            f"train.devices: {cfg.devices} is implemented for transformers-native models; ChatGLM-6B's "
            "prefix lives inside its remote-code model, which ptune trains on one GPU: set "
            "train.devices: 1"
        )
    return backend


def _accelerator(cfg: TrainConfig):
    acc = multiprocess.accelerator()
    if acc.num_processes != cfg.devices:
        raise PtuneError(
            f"train.devices is {cfg.devices}, but this process is one of {acc.num_processes}; let `ptune train` "
            "launch the processes itself"
        )
    return acc


def _load(backend: backends.Backend, cfg: TrainConfig, acc) -> tuple[Trainer, dict[str, int]]:
    """The model with its prefix, the training split and the optimizer; the parameter counts, for the facts."""
    dev, dtype = acc.device, DTYPES[cfg.precision]
    # The frozen base in the compute dtype on a GPU (half the memory); on the CPU it stays fp32 under autocast.
    # The prefix, fp32 master weights, is the only trainable module (for chatglm it lives inside the model).
    model, encoder = backend.load_for_training(BASE, dev, dtype if dev.type == "cuda" else torch.float32, cfg)
    total = assert_frozen(model, encoder)
    trainable = sum(p.numel() for p in encoder.parameters())
    log.info(
        "trainable parameters: %d of %d (%.4f%%); base frozen",
        trainable,
        total + trainable,
        100 * trainable / (total + trainable),
    )

    # Here, not at the top: importing datasets takes seconds, which a stage that fails its checks need not spend.
    from datasets import load_from_disk

    train = load_from_disk(str(DATA))["train"]
    check_context(model, train, cfg)
    _check_batch(cfg, len(train), acc.num_processes, acc.process_index)
    return Trainer.create(model, encoder, backend, cfg, train, acc), {
        "trainable_parameters": trainable,
        "total_parameters": total + trainable,
    }


def _check_batch(cfg: TrainConfig, n_rows: int, world: int, rank: int) -> None:
    per_device = cfg.per_device_train_batch_size
    global_batch = per_device * world
    if world > 1 and n_rows < global_batch:
        raise PtuneError(
            f"train.devices: {world} x per_device_train_batch_size {per_device} needs at least "
            f"{global_batch} training examples, {DATA} has {n_rows}; lower one of the two"
        )
    if rank == 0:
        log.info(
            "effective batch: %d per device x %d accumulation x %d device(s) = %d",
            per_device,
            cfg.gradient_accumulation_steps,
            world,
            global_batch * cfg.gradient_accumulation_steps,
        )


def _resume(ctx: RunContext, trainer: Trainer) -> tuple[int, list, list[float]]:
    """From the latest checkpoint of this run's resume state, if any: (its step, log rows, losses since the last
    row); else (0, [], [])."""
    if (ckpt_path := latest_checkpoint(ctx.state)) is None:
        return 0, [], []
    # Onto the CPU: RNG states must be CPU tensors, and load_state_dict moves the rest to the device.
    ckpt = checkpoint.load_training(ckpt_path, trainer.acc.process_index)  # restores this rank's RNG states too
    trainer.load(ckpt)
    log.info("resuming from %s: step %d of %d", ckpt_path, ckpt["step"], trainer.cfg.max_steps)
    return ckpt["step"], ckpt["log_rows"], ckpt["window_losses"]


def _steps(ctx: RunContext, trainer: Trainer, curve: Curve, start: int) -> None:
    """Steps `start` to max_steps: each logged every logging_steps, a checkpoint every save_steps, and a stop
    request honoured after the step it comes in."""
    acc, cfg = trainer.acc, trainer.cfg
    quiet = {"disable": True} if acc.process_index != 0 else {}  # one progress bar, rank 0's
    bar = tqdm(
        range(start, cfg.max_steps),
        initial=start,
        total=cfg.max_steps,
        desc="train prefix",
        unit="step",
        mininterval=2,
        **quiet,
    )
    for step in bar:
        done = trainer.step(step)
        _check_loss(done.loss, step, cfg, ctx.state)
        curve.add(done)
        ctx.fault("step")
        bar.set_postfix(loss=f"{done.loss:.3f}", lr=f"{done.lr:.2e}", refresh=False)
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.max_steps:
            row = curve.row(step + 1, done.lr)
            if acc.is_main_process:
                write_log(curve.rows)
                ctx.log(step + 1, live_values(row))
        periodic = (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps
        if periodic:
            _checkpoint(ctx, trainer, curve, step + 1)
        # SIGTERM, SIGINT or SIGHUP during this step (to this process, or, with several, to any of them)
        if (ctx.stop_request() if acc.num_processes == 1 else _agreed_stop(acc)) is not None:
            _stop(ctx, trainer, curve, step + 1, saved=periodic)


def _check_loss(loss: float, step: int, cfg: TrainConfig, state: ResumeState) -> None:
    if not math.isfinite(loss) or loss == 0.0:
        hint = (
            " fp16 overflows here: use bf16 (or fp32)"
            if cfg.precision == "fp16"
            else " lower train.learning_rate or check the data"
        )
        raise PtuneError(
            f"train: the loss is {loss} at step {step + 1};{hint}. Nothing was saved "
            f"to {OUT}; checkpoints before this step are kept in {state.dir}"
        )


class Curve:
    """reports/train_log.csv as it grows: the rows so far, and the steps since the last row (their losses, the
    rows they read, the time they took), which make the next one."""

    def __init__(self, rows: list, window: list[float]):
        self.rows, self.window = rows, list(window)
        self.samples, self.since = 0, time.perf_counter()

    def add(self, step: Step) -> None:
        self.window.append(step.loss)
        self.samples += step.samples

    def row(self, step: int, lr: float) -> tuple:
        """The row after `step` (1-based); loss: the mean over the steps since the last row. samples/s is the one
        column that varies between reruns; reports compare the others."""
        elapsed = time.perf_counter() - self.since
        mean_loss = sum(self.window) / len(self.window)
        self.rows.append((step, round(mean_loss, 6), f"{lr:.6g}", round(self.samples / max(elapsed, 1e-9), 2)))
        self.since, self.samples, self.window = time.perf_counter(), 0, []
        return self.rows[-1]


def write_log(rows: list) -> None:
    """reports/train_log.csv with every row so far: the whole file anew, atomically (never appended to: after a DVC
    run it may be a hard link into DVC's cache), so that a reader, or a kill, only ever meets whole rows."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LOG_HEADER)
    writer.writerows(rows)
    atomic.write_text(TRAIN_LOG, buf.getvalue())


def live_values(row) -> dict[str, float]:
    """One train_log.csv row as the live trackers get it."""
    return {name: float(value) for name, value in zip(LOG_HEADER[1:], row[1:])}


def _checkpoint(ctx: RunContext, trainer: Trainer, curve: Curve, step: int) -> None:
    """A periodic checkpoint after `step`; every push_every-th one is pushed (docs/surviving.md)."""
    from accelerate.utils import gather_object

    rng = gather_object([checkpoint.rng_state()])  # every rank's generators (one CUDA generator per GPU)
    if trainer.acc.is_main_process:
        save_checkpoint(ctx.state, step, trainer, curve, rng)
        ctx.fault("checkpoint")
        ctx.checkpoint_written()


def save_checkpoint(state: ResumeState, step: int, trainer: Trainer, curve: Curve, rng_per_rank: list) -> None:
    """Everything resuming needs (safetensors, never a pickle; the RNG states of every process); the oldest beyond
    save_total_limit removed. Called on rank 0 only: the prefix and optimizer are the same on every rank after each
    step."""
    checkpoint.save_training(
        state.path(f"checkpoint-{step:08d}{CKPT_SUFFIX}"),
        step=step,
        **trainer.state_dicts(),
        log_rows=curve.rows,
        rng_per_rank=rng_per_rank,
        window_losses=curve.window,
    )
    for old in sorted(state.dir.glob(f"checkpoint-*{CKPT_SUFFIX}"))[: -trainer.cfg.save_total_limit]:
        old.unlink()


def latest_checkpoint(state: ResumeState) -> Path | None:
    found = sorted(state.dir.glob(f"checkpoint-*{CKPT_SUFFIX}"))
    return found[-1] if found else None


def _agreed_stop(acc) -> stopping.Request | None:
    """Several processes: the stop request any of them has got (the highest signal number), so that all of them
    stop after the same step, and none is left waiting in a collective operation for one that has gone."""
    from accelerate.utils import gather_object

    own = stopping.requested()
    signum = int(acc.reduce(torch.tensor(own.signum if own else 0, device=acc.device), "max").item())
    if not signum:
        return None  # one that came during the reduction counts at the next step, on every rank
    # Once, on stopping: the reason of a process that got that signal, the same in every process's message.
    reasons = gather_object([own.reason if own is not None and own.signum == signum else ""])
    return stopping.note(signum, next(r for r in reasons if r))


def _stop(ctx: RunContext, trainer: Trainer, curve: Curve, step: int, saved: bool):
    """Stop on request after `step` (state/stopping.py): a checkpoint at that step (unless `saved`: the step just
    wrote one), `stopped.json` beside it, the live metrics closed; then raise stopping.Stopped. Several processes:
    every one comes here after the same step; rank 0 writes (and pushes) while the others wait."""
    acc, cfg = trainer.acc, trainer.cfg
    world = acc.num_processes
    name = ctx.state.path(f"checkpoint-{step:08d}{CKPT_SUFFIX}")
    pushed = False
    if world > 1:
        from accelerate.utils import gather_object

        rng = None if saved else gather_object([checkpoint.rng_state()])  # every rank's generators
        log.info("stopping after step %d, as all %d processes agreed", step, world)
    else:
        rng = [checkpoint.rng_state()]
    if acc.is_main_process:
        if not saved:
            save_checkpoint(ctx.state, step, trainer, curve, rng)
        ctx.record_stop(step=step, max_steps=cfg.max_steps, checkpoint=name.name)
        ctx.close_live()
        # The instance may be going away: send the checkpoint where the next one can find it.
        pushed = ctx.push_on_stop()
    if world > 1:
        acc.wait_for_everyone()  # the launcher ends the others once one has exited: not before rank 0 is done
    where = ", pushed to the DVC remote (`ptune restore` brings it to a fresh instance)" if pushed else ""
    processes = f" (all {world} processes)" if world > 1 else ""
    request = ctx.stop_request()
    raise stopping.Stopped(
        request,
        f"train: stopped ({request.reason}) after step {step} of {cfg.max_steps}{processes}; {name} holds it{where}. "
        "`dvc repro`, `snakemake --cores 1 report` or `ptune train` resumes from that step",
    )


def _facts(trainer: Trainer, sizes: dict[str, int], start: int, train_s: float) -> dict:
    """What reports/timings/train.json records of this run."""
    cfg, dev, world = trainer.cfg, trainer.acc.device, trainer.acc.num_processes
    per_device = cfg.per_device_train_batch_size
    # Every micro-batch holds batch_size rows (or the whole set when it is smaller): compute.training.batch_indices.
    per_step = cfg.gradient_accumulation_steps * min(per_device, len(trainer.data)) * world
    return {
        "trainable_parameters": sizes["trainable_parameters"],
        "total_parameters": sizes["total_parameters"],
        "resumed_from_step": start,
        "precision": cfg.precision,
        "quantization": cfg.quantization,
        "device": str(dev),
        "backend": trainer.backend.name,
        "transformers": transformers.__version__,
        "device_name": device_info.device_name(dev),
        "effective_batch": per_device * world * cfg.gradient_accumulation_steps,
        "steps": cfg.max_steps,
        "samples_seen": cfg.max_steps * per_step,
        # Speed of the steps this process ran (a resumed run did not time the ones before it).
        "train_s": round(train_s, 3),
        "samples_per_s": round((cfg.max_steps - start) * per_step / max(train_s, 1e-9), 2),
        **device_info.peak_memory(dev),
    }
